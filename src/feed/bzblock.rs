//! A fast decoder for one bzip2 block, in safe Rust.
//!
//! Responsibility: given the bits of exactly one block (from its 48-bit block
//! magic to the bit where the next magic starts), produce the block's bytes and
//! check them against the block's stored CRC. Framing, streams, the combined CRC
//! and parallelism belong to [`super::decode`], which falls back to libbz2 for
//! any block this decoder rejects, so an error here costs time, never output.
//!
//! The stages and what makes each fast:
//!
//! ```text
//!  bits ──► header, selectors, code lengths ─► Huffman tables (10-bit lookup)
//!       ──► symbols ─► RUNA/RUNB runs + move-to-front ─► L column (`ll`, bytes)
//!       ──► counting sort ─► `tt[j] = next row << 8 | byte` (one u32 per row)
//!       ──► follow the chain from origPtr ─► undo the initial RLE ─► CRC
//! ```
//!
//! * Bits come from a 64-bit MSB-first buffer refilled 8 bytes at a time; a
//!   Huffman symbol is one table lookup on the next 10 bits (longer codes, rare,
//!   take a canonical-code walk).
//! * The move-to-front list is 32 little-endian `u64` words: moving entry `n`
//!   shifts whole words by one byte (`n / 8` of them) instead of `n` bytes.
//! * The inverse BWT stores, per row, the *first*-column byte next to the next
//!   row (libbz2's "fast" layout, with F instead of L so the counting sort fills
//!   each entry in one write): one dependent load per output byte.
//! * The initial run-length coding is undone by copying whole runs-free spans,
//!   found 64 positions at a time by a loop the compiler vectorises; the CRC is
//!   slicing-by-8.
//! * Hot loops index fixed-size arrays with masked indices or `u8` values, so
//!   they carry no bounds checks, and there is no `unsafe`.
//!
//! Robustness: every length, count and index read from the input is checked
//! (the same checks libbz2 makes, so both accept the same blocks), the work is
//! bounded by the level's block size, and memory is two fixed arrays per decoder
//! (5 MiB, allocated once; pages beyond the level's block size stay untouched).
//! Randomised blocks (written only by bzip2 0.9.0) are reported as
//! [`BlockError::Randomised`] for the caller's fallback.

use std::ops::Range;

/// Starts every block (BCD of pi).
const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
/// Rows addressable in [`BlockDecoder`]'s arrays: a power of two above the
/// largest block (900,000 bytes), so `index & ROW_MASK` needs no bounds check.
const ROWS: usize = 1 << 20;
const ROW_MASK: usize = ROWS - 1;
/// Most selectors libbz2 keeps (2 + 900,000 / 50); later ones are read and dropped.
const MAX_SELECTORS: usize = 18_002;
/// Longest Huffman code.
const MAX_CODE_LEN: u32 = 20;
/// Bits resolved by one lookup in a [`HuffTable`]'s fast table.
const FAST_BITS: u32 = 10;
/// Symbols per selector group.
const GROUP_SIZE: usize = 50;

/// Why a block was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The bits do not start with a block magic, or the level is not 1..=9.
    #[error("not a bzip2 block")]
    Magic,
    /// A randomised block (bzip2 0.9.0); not supported here.
    #[error("randomised block")]
    Randomised,
    /// A header field, selector or code length is out of range.
    #[error("invalid block header: {0}")]
    Header(&'static str),
    /// The Huffman-coded data is invalid (bad code, runs or sizes).
    #[error("invalid block data: {0}")]
    Data(&'static str),
    /// The data does not end exactly where the block's bits end.
    #[error("block data ends at bit {decoded} instead of {expected}")]
    Length { decoded: u64, expected: u64 },
    /// The decoded bytes do not match the block CRC.
    #[error("block CRC mismatch")]
    Crc,
}

/// One decoded block's facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// The block CRC (stored, and verified).
    pub crc: u32,
    /// Bytes appended to the output.
    pub len: usize,
}

/// Decodes single bzip2 blocks; keeps its ~5 MiB of work arrays between
/// blocks, so keep one per thread.
pub struct BlockDecoder {
    /// Per row: first-column byte | next row << 8 (see module doc).
    tt: Box<[u32; ROWS]>,
    /// The block's L column (BWT output), then the un-BWT'd bytes.
    ll: Box<[u8; ROWS]>,
    /// Huffman table of each group (2..=6 used).
    tables: Box<[HuffTable; 6]>,
    /// Table index of each group of 50 symbols.
    selectors: Vec<u8>,
}

impl Default for BlockDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BlockDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDecoder").finish_non_exhaustive()
    }
}

impl BlockDecoder {
    /// A decoder with its arrays allocated (zeroed lazily by the OS).
    pub fn new() -> Self {
        fn boxed<T: Copy + Default, const N: usize>() -> Box<[T; N]> {
            match vec![T::default(); N].into_boxed_slice().try_into() {
                Ok(b) => b,
                Err(_) => unreachable!("a vec of N elements"),
            }
        }
        BlockDecoder {
            tt: boxed(),
            ll: boxed(),
            tables: Box::new([HuffTable::EMPTY; 6]),
            selectors: Vec::with_capacity(MAX_SELECTORS),
        }
    }

    /// Decodes the block whose bits are `bits` of `src` (MSB-first bit offsets,
    /// starting at the block magic and ending where the next magic starts) in a
    /// stream of block size `level` (1..=9), appending its bytes to `out`.
    /// On error `out` is left as it was.
    pub fn decode(
        &mut self,
        src: &[u8],
        bits: Range<u64>,
        level: u8,
        out: &mut Vec<u8>,
    ) -> Result<BlockInfo, BlockError> {
        let start = out.len();
        let r = self.decode_inner(src, bits, level, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn decode_inner(
        &mut self,
        src: &[u8],
        bits: Range<u64>,
        level: u8,
        out: &mut Vec<u8>,
    ) -> Result<BlockInfo, BlockError> {
        if !(1..=9).contains(&level) || bits.end > src.len() as u64 * 8 || bits.start > bits.end
        {
            return Err(BlockError::Magic);
        }
        // Bits past the block read as zero; the end position is checked below.
        let src = &src[..bits.end.div_ceil(8) as usize];
        let end = bits.end;
        let mut br = BitReader::new(src, bits.start);
        if br.bits(24) << 24 | br.bits(24) != BLOCK_MAGIC {
            return Err(BlockError::Magic);
        }
        let stored_crc = br.bits(32) as u32;
        if br.bits(1) != 0 {
            return Err(BlockError::Randomised);
        }
        let orig_ptr = br.bits(24) as usize;
        let max_rows = usize::from(level) * 100_000;
        if orig_ptr > 10 + max_rows {
            return Err(BlockError::Header("origPtr out of range"));
        }
        let (alphabet, n_in_use) = read_symbol_map(&mut br)?;
        let n_groups = br.bits(3) as usize;
        if !(2..=6).contains(&n_groups) {
            return Err(BlockError::Header("number of Huffman tables not in 2..=6"));
        }
        self.read_selectors(&mut br, n_groups)?;
        let alpha_size = n_in_use + 2;
        for table in &mut self.tables[..n_groups] {
            let mut lens = [0u8; 258];
            read_code_lengths(&mut br, &mut lens[..alpha_size])?;
            table.build(&lens[..alpha_size])?;
        }

        let (nblock, counts) = self.read_symbols(&mut br, &alphabet, alpha_size, max_rows, end)?;
        let decoded = br.position();
        if decoded != end {
            return Err(BlockError::Length {
                decoded,
                expected: end,
            });
        }
        if orig_ptr >= nblock {
            return Err(BlockError::Data("origPtr beyond the block"));
        }
        self.inverse_bwt(nblock, orig_ptr, &counts);

        let start = out.len();
        undo_initial_rle(&self.ll[..nblock], out)?;
        if crc32(&out[start..]) != stored_crc {
            return Err(BlockError::Crc);
        }
        Ok(BlockInfo {
            crc: stored_crc,
            len: out.len() - start,
        })
    }

    /// Reads the selector count and the MTF/unary-coded selectors.
    fn read_selectors(&mut self, br: &mut BitReader<'_>, n_groups: usize) -> Result<(), BlockError> {
        let n = br.bits(15) as usize;
        if n == 0 {
            return Err(BlockError::Header("no selectors"));
        }
        let mut mtf = [0u8, 1, 2, 3, 4, 5];
        self.selectors.clear();
        for _ in 0..n {
            br.refill();
            // Unary: j ones and a zero. At most 6 ones are valid, 56 bits are buffered.
            let j = br.buf.leading_ones() as usize;
            if j >= n_groups {
                return Err(BlockError::Header("selector out of range"));
            }
            br.consume(j as u32 + 1);
            let v = mtf[j];
            mtf.copy_within(0..j, 1);
            mtf[0] = v;
            if self.selectors.len() < MAX_SELECTORS {
                self.selectors.push(v);
            }
        }
        Ok(())
    }

    /// Decodes the Huffman-coded MTF/RUNA/RUNB symbols into `ll` (the BWT's L
    /// column); returns its length and the count of each byte in it.
    fn read_symbols(
        &mut self,
        br: &mut BitReader<'_>,
        alphabet: &[u8; 256],
        alpha_size: usize,
        max_rows: usize,
        end: u64,
    ) -> Result<(usize, [u32; 256]), BlockError> {
        let eob = alpha_size as u32 - 1;
        let ll = &mut *self.ll;
        let mut mtf = Mtf::new(alphabet);
        let mut counts = [0u32; 256];
        let mut nblock = 0usize;
        // Pending run of the front byte: RUNA/RUNB digits in bijective base 2.
        let (mut run, mut run_digits) = (0usize, 0u32);
        for &sel in &self.selectors {
            // Garbage reads as zero bits past the end: stop within one group.
            if br.position() > end {
                return Err(BlockError::Data("block data runs past the block"));
            }
            let table = &self.tables[usize::from(sel)];
            for _ in 0..GROUP_SIZE {
                if br.n < MAX_CODE_LEN {
                    br.refill();
                }
                let (sym, len) = table.decode(br.buf)?;
                br.consume(len);
                if sym <= 1 {
                    // RUNA adds 1 << k, RUNB 2 << k. libbz2 rejects a 22nd
                    // digit; 21 digits already exceed any block.
                    if run_digits > 20 {
                        return Err(BlockError::Data("run too long"));
                    }
                    run += ((sym + 1) as usize) << run_digits;
                    run_digits += 1;
                    continue;
                }
                if run_digits > 0 {
                    let b = mtf.front();
                    let to = nblock + run;
                    let Some(dst) = ll.get_mut(nblock..to).filter(|_| to <= max_rows) else {
                        return Err(BlockError::Data("run beyond the block size"));
                    };
                    dst.fill(b);
                    counts[usize::from(b)] += run as u32;
                    nblock = to;
                    (run, run_digits) = (0, 0);
                }
                if sym == eob {
                    return Ok((nblock, counts));
                }
                if nblock >= max_rows {
                    return Err(BlockError::Data("block larger than the block size"));
                }
                // sym is in 2..eob <= 257, so the index is in 1..=255.
                let b = mtf.move_to_front((sym - 1) as u8);
                ll[nblock & ROW_MASK] = b;
                counts[usize::from(b)] += 1;
                nblock += 1;
            }
        }
        Err(BlockError::Data("more groups than selectors"))
    }

    /// Turns `ll[..nblock]` (L column) into the block's bytes, in place.
    fn inverse_bwt(&mut self, nblock: usize, orig_ptr: usize, counts: &[u32; 256]) {
        // cf[b]: first row whose first-column byte is b.
        let mut cf = [0u32; 256];
        let mut sum = 0;
        for (c, &n) in cf.iter_mut().zip(counts) {
            *c = sum;
            sum += n;
        }
        let (tt, ll) = (&mut *self.tt, &mut self.ll[..nblock]);
        // Row i's L byte b is the F byte of row j = cf[b]++ (the LF mapping);
        // reading the text forwards goes from row j to row i.
        for (i, &b) in ll.iter().enumerate() {
            let j = &mut cf[usize::from(b)];
            tt[*j as usize & ROW_MASK] = (i as u32) << 8 | u32::from(b);
            *j += 1;
        }
        let mut row = orig_ptr;
        for byte in ll.iter_mut() {
            let e = tt[row & ROW_MASK];
            *byte = e as u8;
            row = (e >> 8) as usize;
        }
    }
}

/// Reads the 16x16 bitmap of bytes used; returns them in order (the first
/// `n` entries) and `n` (>= 1).
fn read_symbol_map(br: &mut BitReader<'_>) -> Result<([u8; 256], usize), BlockError> {
    let used16 = br.bits(16);
    let mut alphabet = [0u8; 256];
    let mut n = 0;
    for hi in 0..16 {
        if used16 & (0x8000 >> hi) == 0 {
            continue;
        }
        let used = br.bits(16);
        for lo in 0..16 {
            if used & (0x8000 >> lo) != 0 {
                alphabet[n] = (hi * 16 + lo) as u8;
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err(BlockError::Header("no symbols in use"));
    }
    Ok((alphabet, n))
}

/// Reads one table's delta-coded code lengths (each 1..=20).
fn read_code_lengths(br: &mut BitReader<'_>, lens: &mut [u8]) -> Result<(), BlockError> {
    let mut curr = br.bits(5) as i32;
    for len in lens {
        loop {
            if !(1..=MAX_CODE_LEN as i32).contains(&curr) {
                return Err(BlockError::Header("code length not in 1..=20"));
            }
            if br.bits(1) == 0 {
                break;
            }
            curr += if br.bits(1) == 0 { 1 } else { -1 };
        }
        *len = curr as u8;
    }
    Ok(())
}

/// Undoes bzip2's initial run-length coding (4 equal bytes, then a count of
/// 0..=255 more), appending to `out`.
fn undo_initial_rle(mut src: &[u8], out: &mut Vec<u8>) -> Result<(), BlockError> {
    out.reserve(src.len());
    while let Some(j) = find_run4(src) {
        let Some(&count) = src.get(j + 4) else {
            // libbz2 rejects a block ending in a run without its count.
            return Err(BlockError::Data("run of 4 without a count"));
        };
        out.extend_from_slice(&src[..j + 4]);
        out.resize(out.len() + usize::from(count), src[j]);
        src = &src[j + 5..];
    }
    out.extend_from_slice(src);
    Ok(())
}

/// First `j` with `s[j..j + 4]` four equal bytes.
fn find_run4(s: &[u8]) -> Option<usize> {
    const STARTS: usize = 64;
    let is_run = |w: &[u8]| w[0] == w[1] && w[1] == w[2] && w[2] == w[3];
    let mut at = 0;
    // Vectorisable: is there any run starting in the next 64 positions?
    while let Some(c) = s.get(at..at + STARTS + 3) {
        let c: &[u8; STARTS + 3] = c.try_into().ok()?;
        let mut any = u8::MAX;
        for k in 0..STARTS {
            any = any.min((c[k] ^ c[k + 1]) | (c[k] ^ c[k + 2]) | (c[k] ^ c[k + 3]));
        }
        if any == 0 {
            return c.windows(4).position(is_run).map(|k| at + k);
        }
        at += STARTS;
    }
    s.get(at..)?.windows(4).position(is_run).map(|k| at + k)
}

// ------------------------------------------------------------------ bits

/// MSB-first reader over a byte slice; bits past its end read as zero.
struct BitReader<'a> {
    src: &'a [u8],
    /// Next byte of `src` to load (may pass its end).
    pos: usize,
    /// Unconsumed bits, MSB first; the top `n` are valid, the rest are either
    /// zero or the correct following bits.
    buf: u64,
    n: u32,
}

impl<'a> BitReader<'a> {
    fn new(src: &'a [u8], bit: u64) -> Self {
        let mut br = BitReader {
            src,
            pos: (bit / 8) as usize,
            buf: 0,
            n: 0,
        };
        br.refill();
        br.consume((bit % 8) as u32);
        br
    }

    /// Tops the buffer up to at least 56 valid bits.
    #[inline(always)]
    fn refill(&mut self) {
        if let Some(b) = self.src.get(self.pos..self.pos + 8) {
            // Load 8 bytes, keep whole bytes; re-loading bits already there
            // ORs equal values (Giesen's branch-free refill).
            let w = u64::from_be_bytes(b.try_into().unwrap_or_default());
            self.buf |= w >> self.n;
            let k = (63 - self.n) >> 3;
            self.pos += k as usize;
            self.n += k << 3;
        } else {
            self.refill_tail();
        }
    }

    #[cold]
    #[inline(never)]
    fn refill_tail(&mut self) {
        while self.n <= 56 {
            let b = self.src.get(self.pos).copied().unwrap_or(0);
            self.buf |= u64::from(b) << (56 - self.n);
            self.pos += 1;
            self.n += 8;
        }
    }

    #[inline(always)]
    fn consume(&mut self, k: u32) {
        self.buf <<= k;
        self.n -= k;
    }

    /// The next `k` (1..=32) bits.
    fn bits(&mut self, k: u32) -> u64 {
        if self.n < k {
            self.refill();
        }
        let v = self.buf >> (64 - k);
        self.consume(k);
        v
    }

    /// Bit offset of the next unread bit in `src`.
    fn position(&self) -> u64 {
        self.pos as u64 * 8 - u64::from(self.n)
    }
}

// --------------------------------------------------------------- Huffman

/// Decoding table of one canonical Huffman code (bzip2 assigns codes in order
/// of length, then symbol).
#[derive(Clone, Copy)]
struct HuffTable {
    /// By the next [`FAST_BITS`] bits: symbol << 5 | code length, or 0 if the
    /// code is longer (or the bits are no code).
    fast: [u16; 1 << FAST_BITS],
    /// Per code length: first code, number of codes, and position in `perm`
    /// of the first symbol.
    first: [u32; MAX_CODE_LEN as usize + 1],
    count: [u32; MAX_CODE_LEN as usize + 1],
    offset: [u32; MAX_CODE_LEN as usize + 1],
    /// Symbols in code order.
    perm: [u16; 258],
    max_len: u32,
}

impl HuffTable {
    const EMPTY: HuffTable = HuffTable {
        fast: [0; 1 << FAST_BITS],
        first: [0; MAX_CODE_LEN as usize + 1],
        count: [0; MAX_CODE_LEN as usize + 1],
        offset: [0; MAX_CODE_LEN as usize + 1],
        perm: [0; 258],
        max_len: 0,
    };

    /// Builds the table for code lengths `lens` (each 1..=20, 3..=258 of them).
    /// Rejects over-subscribed codes (libbz2 would decode them some other way);
    /// an incomplete code is fine until an unassigned bit pattern turns up.
    fn build(&mut self, lens: &[u8]) -> Result<(), BlockError> {
        self.count = [0; MAX_CODE_LEN as usize + 1];
        self.max_len = 0;
        for &l in lens {
            self.count[usize::from(l)] += 1;
        }
        let (mut code, mut offset, mut left) = (0u32, 0u32, 1i64);
        for l in 1..=MAX_CODE_LEN as usize {
            left = 2 * left - i64::from(self.count[l]);
            if left < 0 {
                return Err(BlockError::Header("over-subscribed Huffman code"));
            }
            self.first[l] = code;
            self.offset[l] = offset;
            code = (code + self.count[l]) << 1;
            offset += self.count[l];
            if self.count[l] > 0 {
                self.max_len = l as u32;
            }
        }
        let mut next = self.offset;
        for (sym, &l) in lens.iter().enumerate() {
            let slot = &mut next[usize::from(l)];
            self.perm[*slot as usize] = sym as u16;
            *slot += 1;
        }
        self.fast = [0; 1 << FAST_BITS];
        for l in 1..=FAST_BITS.min(self.max_len) {
            let (first, offset) = (self.first[l as usize], self.offset[l as usize]);
            for k in 0..self.count[l as usize] {
                let entry = self.perm[(offset + k) as usize] << 5 | l as u16;
                let at = ((first + k) << (FAST_BITS - l)) as usize;
                self.fast[at..at + (1 << (FAST_BITS - l))].fill(entry);
            }
        }
        Ok(())
    }

    /// (symbol, code length) of the code at the top of `buf` (>= 20 valid bits).
    #[inline(always)]
    fn decode(&self, buf: u64) -> Result<(u32, u32), BlockError> {
        let e = self.fast[(buf >> (64 - FAST_BITS)) as usize];
        if e != 0 {
            Ok((u32::from(e >> 5), u32::from(e & 31)))
        } else {
            self.decode_long(buf)
        }
    }

    #[cold]
    #[inline(never)]
    fn decode_long(&self, buf: u64) -> Result<(u32, u32), BlockError> {
        for l in FAST_BITS + 1..=self.max_len {
            let d = ((buf >> (64 - l)) as u32).wrapping_sub(self.first[l as usize]);
            if d < self.count[l as usize] {
                let sym = self.perm[(self.offset[l as usize] + d) as usize];
                return Ok((u32::from(sym), l));
            }
        }
        Err(BlockError::Data("invalid Huffman code"))
    }
}

// ---------------------------------------------------------- move to front

/// The move-to-front list: byte k is `words[k / 8] >> (8 * (k % 8))`.
struct Mtf {
    words: [u64; 32],
}

impl Mtf {
    fn new(alphabet: &[u8; 256]) -> Self {
        let mut words = [0u64; 32];
        for (w, c) in words.iter_mut().zip(alphabet.chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().unwrap_or_default());
        }
        Mtf { words }
    }

    #[inline(always)]
    fn front(&self) -> u8 {
        self.words[0] as u8
    }

    /// Moves entry `n` (>= 1) to the front and returns it.
    #[inline(always)]
    fn move_to_front(&mut self, n: u8) -> u8 {
        let (wi, sh) = (usize::from(n >> 3), u32::from(n & 7) * 8);
        let w = self.words[wi];
        let v = (w >> sh) & 0xff;
        let below = (1u64 << sh) - 1;
        let above = (!0u64 << 8) << sh;
        let carry = if wi == 0 {
            v
        } else {
            self.words[wi - 1] >> 56
        };
        self.words[wi] = (w & above) | ((w & below) << 8) | carry;
        if wi > 0 {
            for k in (1..wi).rev() {
                self.words[k] = self.words[k] << 8 | self.words[k - 1] >> 56;
            }
            self.words[0] = self.words[0] << 8 | v;
        }
        v as u8
    }
}

// ------------------------------------------------------------------- CRC

/// bzip2's CRC-32 (MSB first, polynomial 0x04c11db7) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let a = crc ^ u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        crc = t[7][(a >> 24) as usize]
            ^ t[6][(a >> 16 & 0xff) as usize]
            ^ t[5][(a >> 8 & 0xff) as usize]
            ^ t[4][(a & 0xff) as usize]
            ^ t[3][usize::from(c[4])]
            ^ t[2][usize::from(c[5])]
            ^ t[1][usize::from(c[6])]
            ^ t[0][usize::from(c[7])];
    }
    for &b in chunks.remainder() {
        crc = crc << 8 ^ t[0][usize::from((crc >> 24) as u8 ^ b)];
    }
    !crc
}

/// Slicing-by-8 tables: `[k][b]` is the CRC update for byte `b` followed by
/// `k` zero bytes.
static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut b = 0;
    while b < 256 {
        let mut c = (b as u32) << 24;
        let mut k = 0;
        while k < 8 {
            c = if c & 0x8000_0000 != 0 {
                c << 1 ^ 0x04c1_1db7
            } else {
                c << 1
            };
            k += 1;
        }
        t[0][b] = c;
        b += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut b = 0;
        while b < 256 {
            let p = t[k - 1][b];
            t[k][b] = p << 8 ^ t[0][(p >> 24) as usize];
            b += 1;
        }
        k += 1;
    }
    t
}
