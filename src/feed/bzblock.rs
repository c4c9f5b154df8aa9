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
//!       ──► follow 256 chains at once, stitch ─► undo the initial RLE ─► CRC
//! ```
//!
//! * Bits come from a 64-bit MSB-first buffer refilled 8 bytes at a time; a
//!   Huffman symbol is one table lookup on the next 10 bits (longer codes, rare,
//!   take a canonical-code walk).
//! * The move-to-front list is 32 little-endian `u64` words: moving entry `n`
//!   shifts whole words by one byte (`n / 8` of them) instead of `n` bytes.
//! * The inverse BWT stores, per row, the *first*-column byte next to the next
//!   row (libbz2's "fast" layout, with F instead of L so the counting sort fills
//!   each entry in one write). Each output byte is a load that depends on the
//!   previous one and mostly misses the cache, so the text is cut into up to
//!   256 segments at marked rows and their chains are followed in turn: the
//!   CPU overlaps their misses (this doubled the whole decoder's speed on
//!   feed data).
//! * The initial run-length coding is undone by copying whole runs-free spans,
//!   found 64 positions at a time by a loop the compiler vectorises; the CRC is
//!   slicing-by-8.
//! * Hot loops index fixed-size arrays with masked indices or `u8` values, so
//!   they carry no bounds checks, and there is no `unsafe`.
//!
//! Robustness: every length, count and index read from the input is checked
//! (the same checks libbz2 makes, so both accept the same blocks), the work is
//! bounded by the level's block size, and memory is a few fixed arrays per
//! decoder (8 MiB, allocated once; pages beyond the level's block size stay
//! untouched).
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
/// Runs from RUNA/RUNB symbols at least this long are inverted in bulk.
const LONG_RUN: usize = 8;

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

/// Decodes single bzip2 blocks; keeps its ~8 MiB of work arrays between
/// blocks, so keep one per thread.
pub struct BlockDecoder {
    /// Per row: first-column byte | next row << 8 (see module doc); before
    /// that, the Huffman-decoded symbols.
    tt: Box<[u32; ROWS]>,
    /// Where the chains of the inverse BWT write (see [`walk_chains`]).
    arena: Box<[u8; ARENA]>,
    /// The block's L column (BWT output), then the un-BWT'd bytes.
    ll: Box<[u8; ROWS]>,
    /// Huffman table of each group (2..=6 used).
    tables: Box<[HuffTable; 6]>,
    /// Table index of each group of 50 symbols.
    selectors: Vec<u8>,
    /// (start, length) in `ll` of the runs of at least [`LONG_RUN`] bytes,
    /// which are not written to `ll`.
    runs: Box<[(u32, u32); ROWS / LONG_RUN]>,
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
            arena: boxed(),
            ll: boxed(),
            tables: Box::new([HuffTable::EMPTY; 6]),
            selectors: Vec::with_capacity(MAX_SELECTORS),
            runs: boxed(),
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
        if !(1..=9).contains(&level) || bits.end > src.len() as u64 * 8 || bits.start > bits.end {
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

        let n_syms = self.read_symbols(&mut br, alpha_size as u32 - 1, end)?;
        let (nblock, n_runs, counts) = self.undo_mtf(n_syms, &alphabet, max_rows)?;
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
        self.inverse_bwt(nblock, n_runs, orig_ptr, &counts)?;

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
    fn read_selectors(
        &mut self,
        br: &mut BitReader<'_>,
        n_groups: usize,
    ) -> Result<(), BlockError> {
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

    /// Decodes the Huffman-coded symbols into `tt` (free until the inverse
    /// BWT), up to and including the end-of-block symbol `eob`; returns their
    /// number (at most 50 per selector, so at most 900,100).
    fn read_symbols(
        &mut self,
        bits: &mut BitReader<'_>,
        eob: u32,
        end: u64,
    ) -> Result<usize, BlockError> {
        let syms = &mut *self.tt;
        let mut br = *bits;
        let mut n = 0;
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
                syms[n & ROW_MASK] = sym;
                n += 1;
                if sym == eob {
                    *bits = br;
                    return Ok(n);
                }
            }
        }
        Err(BlockError::Data("more groups than selectors"))
    }

    /// Interprets the symbols in `tt[..n_syms]` (RUNA/RUNB runs and
    /// move-to-front indices, ending with the end-of-block symbol): fills `ll`
    /// (the BWT's L column) and `runs`; returns the length of the column, the
    /// number of long runs and the count of each byte.
    fn undo_mtf(
        &mut self,
        n_syms: usize,
        alphabet: &[u8; 256],
        max_rows: usize,
    ) -> Result<(usize, usize, [u32; 256]), BlockError> {
        let (ll, runs) = (&mut *self.ll, &mut *self.runs);
        let mut n_runs = 0;
        let mut mtf = Mtf::new(alphabet);
        let mut counts = [0u32; 256];
        let mut nblock = 0usize;
        // Pending run of the front byte: RUNA/RUNB digits in bijective base 2.
        let (mut run, mut run_digits) = (0usize, 0u32);
        let syms = &self.tt[..n_syms];
        let eob = syms.last().copied().unwrap_or_default();
        for &sym in syms {
            if sym <= 1 {
                // RUNA adds 1 << k, RUNB 2 << k. libbz2 rejects a 22nd digit;
                // 21 digits already exceed any block.
                if run_digits > 20 {
                    return Err(BlockError::Data("run too long"));
                }
                run += ((sym + 1) as usize) << run_digits;
                run_digits += 1;
                continue;
            }
            if run_digits > 0 {
                let b = mtf.front();
                if nblock + run > max_rows {
                    return Err(BlockError::Data("run beyond the block size"));
                }
                if run < LONG_RUN {
                    // One store; the bytes past the run are overwritten later.
                    let dst = ll.get_mut(nblock..nblock + LONG_RUN);
                    let dst: Option<&mut [u8; LONG_RUN]> = dst.and_then(|d| d.try_into().ok());
                    *dst.ok_or(BlockError::Data("run beyond the block size"))? = [b; LONG_RUN];
                } else {
                    // At most max_rows / LONG_RUN long runs fit: the modulo
                    // only elides the bounds check.
                    runs[n_runs % runs.len()] = (nblock as u32, run as u32);
                    ll[nblock & ROW_MASK] = b;
                    n_runs += 1;
                }
                counts[usize::from(b)] += run as u32;
                nblock += run;
                (run, run_digits) = (0, 0);
            }
            if sym == eob {
                break;
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
        Ok((nblock, n_runs, counts))
    }

    /// Turns `ll[..nblock]` (L column, with `runs[..n_runs]`) into the block's
    /// bytes, in place.
    fn inverse_bwt(
        &mut self,
        nblock: usize,
        n_runs: usize,
        orig_ptr: usize,
        counts: &[u32; 256],
    ) -> Result<(), BlockError> {
        // cf[b]: first row whose first-column byte is b.
        let mut cf = [0u32; 256];
        let mut sum = 0;
        for (c, &n) in cf.iter_mut().zip(counts) {
            *c = sum;
            sum += n;
        }
        let (tt, ll) = (&mut *self.tt, &self.ll[..nblock]);
        // Row i's L byte b is the F byte of row j = cf[b]++: the text goes on
        // from row j to row i. Long runs (known from decoding) map consecutive
        // rows to consecutive rows.
        fn scatter(tt: &mut [u32; ROWS], cf: &mut [u32; 256], from: usize, bytes: &[u8]) {
            let mut i = (from as u32) << 8;
            for &b in bytes {
                let j = &mut cf[usize::from(b)];
                tt[*j as usize & ROW_MASK] = i | u32::from(b);
                *j += 1;
                i += 1 << 8;
            }
        }
        let mut done = 0;
        for &(at, len) in &self.runs[..n_runs] {
            let (at, len) = (at as usize, len as usize);
            scatter(tt, &mut cf, done, &ll[done..at]);
            let b = ll[at];
            let j = cf[usize::from(b)] as usize;
            cf[usize::from(b)] += len as u32;
            let i = (at as u32) << 8 | u32::from(b);
            for (k, t) in tt[j..j + len].iter_mut().enumerate() {
                *t = i + ((k as u32) << 8);
            }
            done = at + len;
        }
        scatter(tt, &mut cf, done, &ll[done..]);

        let out = &mut self.ll[..nblock];
        if nblock < MIN_SPLIT {
            let mut row = orig_ptr;
            for byte in out {
                let e = tt[row & ROW_MASK];
                *byte = e as u8;
                row = (e >> 8) as usize;
            }
            return Ok(());
        }
        walk_chains(tt, &mut self.arena, orig_ptr, out)
    }
}

/// Chains the inverse BWT follows at once.
const CHAINS: usize = 256;
/// Blocks shorter than this are walked as one chain (they fit in the cache).
const MIN_SPLIT: usize = CHAINS * 256;
/// Bytes of one region of the arena: chains write into regions and take a
/// fresh one when theirs is full.
const REGION: usize = ROWS / CHAINS;
/// Regions a block can need: one per chain for the start of its segment, plus
/// one per `REGION` bytes of the block (`REGION * CHAINS` exceeds any block).
const REGIONS: usize = 2 * CHAINS;
/// The arena: a power of two above `REGIONS * REGION`, so a masked index needs
/// no bounds check.
const ARENA: usize = 2 * ROWS;
const ARENA_MASK: usize = ARENA - 1;
/// Marks the rows where chains start, in `tt` (row numbers use 20 bits above
/// the byte, so the top bit is free).
const START: u32 = 1 << 31;

/// Writes the text of the cycle through `tt` that starts at row `orig` into
/// `out` (`out.len()` rows).
///
/// Each output byte costs a load that depends on the previous one and mostly
/// misses the cache, so one chain waits on memory for every byte. Instead,
/// `CHAINS` rows spread over the block (and `orig`) are marked as starts, and
/// as many chains are followed in turn, each from its start until it reaches
/// another start: their loads are independent, so the CPU overlaps the
/// misses. The chain from `orig` is the text's first segment; each chain's
/// end names the start of the next segment. Segments are stitched together
/// into `out` until the cycle through `orig` closes; a shorter cycle is
/// repeated, as libbz2's walk would (a periodic block; or a corrupt one, which
/// the CRC then rejects).
fn walk_chains(
    tt: &mut [u32; ROWS],
    arena: &mut [u8; ARENA],
    orig: usize,
    out: &mut [u8],
) -> Result<(), BlockError> {
    let n = out.len();
    let mut start = [0usize; CHAINS];
    start[0] = orig;
    tt[orig & ROW_MASK] |= START;
    let mut k = 1;
    for m in 1..CHAINS {
        let r = m * n / CHAINS;
        if tt[r & ROW_MASK] & START == 0 {
            tt[r & ROW_MASK] |= START;
            start[k] = r;
            k += 1;
        }
    }
    // Per live chain: the row to read next, where its next byte goes, the end
    // of its region, which chain it is; per chain: its region, the start of
    // the segment after its own; per region: bytes written, the next region
    // of the same segment.
    #[derive(Clone, Copy, Default)]
    struct Chain {
        row: usize,
        pos: usize,
        end: usize,
        id: usize,
    }
    let mut live = [Chain::default(); CHAINS];
    let mut region = [0usize; CHAINS];
    let mut succ = [usize::MAX; CHAINS];
    let mut filled = [0usize; REGIONS];
    let mut next_region = [usize::MAX; REGIONS];
    let mut free_region = CHAINS;
    for (m, c) in live.iter_mut().enumerate().take(k) {
        let e = tt[start[m] & ROW_MASK];
        arena[(m * REGION) & ARENA_MASK] = e as u8;
        *c = Chain {
            row: (e >> 8) as usize,
            pos: m * REGION + 1,
            end: (m + 1) * REGION,
            id: m,
        };
        region[m] = m;
    }
    let mut n_live = k;
    while n_live > 0 {
        let mut a = 0;
        while a < n_live {
            let c = &mut live[a % CHAINS];
            let e = tt[c.row & ROW_MASK];
            if e & START != 0 || c.pos == c.end {
                let m = c.id % CHAINS;
                if e & START != 0 {
                    // The next segment starts here.
                    succ[m] = c.row & ROW_MASK;
                    filled[region[m] % REGIONS] = c.pos - region[m] * REGION;
                    n_live -= 1;
                    live[a % CHAINS] = live[n_live % CHAINS];
                    continue;
                }
                // The region is full: take a fresh one.
                if free_region == REGIONS {
                    // Cannot happen: every row is visited at most once, so at
                    // most CHAINS + n / REGION regions fill. A guard, not a path.
                    return Err(BlockError::Data("BWT walk ran out of regions"));
                }
                let r = region[m] % REGIONS;
                (filled[r], next_region[r], region[m]) = (REGION, free_region, free_region);
                c.pos = free_region * REGION;
                c.end = c.pos + REGION;
                free_region += 1;
            }
            arena[c.pos & ARENA_MASK] = e as u8;
            c.pos += 1;
            c.row = (e >> 8) as usize;
            a += 1;
        }
    }
    let mut at = 0;
    let mut m = 0;
    for _ in 0..k {
        let mut r = m;
        while r != usize::MAX {
            let len = filled[r % REGIONS];
            let dst = out
                .get_mut(at..at + len)
                .ok_or(BlockError::Data("BWT table is not one cycle"))?;
            dst.copy_from_slice(&arena[r * REGION..r * REGION + len]);
            at += len;
            r = next_region[r % REGIONS];
        }
        if succ[m] == orig {
            break;
        }
        m = start[..k]
            .iter()
            .position(|&s| s == succ[m])
            .ok_or(BlockError::Data("BWT table is not one cycle"))?;
    }
    // A periodic block's table is several equal cycles: like libbz2's single
    // walk of n steps, go round the cycle through `orig` again.
    if at == 0 {
        return Err(BlockError::Data("BWT table is not one cycle"));
    }
    while at < n {
        let len = at.min(n - at);
        out.copy_within(..len, at);
        at += len;
    }
    Ok(())
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
/// `Copy`, so hot loops work on a local copy the compiler keeps in registers.
#[derive(Clone, Copy)]
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
            *self = self.refilled_at_end();
        }
    }

    /// `refill` within 8 bytes of the end. By value, so that callers' copies
    /// need not live in memory.
    #[cold]
    #[inline(never)]
    fn refilled_at_end(mut self) -> Self {
        while self.n <= 56 {
            let b = self.src.get(self.pos).copied().unwrap_or(0);
            self.buf |= u64::from(b) << (56 - self.n);
            self.pos += 1;
            self.n += 8;
        }
        self
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
        /// By `n % 8`: the bytes of `n`'s word that move up by one place.
        const MOVING: [u64; 8] = {
            let mut m = [!0u64; 8];
            let mut k = 0;
            while k < 7 {
                m[k] = (1 << (8 * (k + 1))) - 1;
                k += 1;
            }
            m
        };
        let (wi, sh) = (usize::from(n >> 3), u32::from(n & 7) * 8);
        let moving = MOVING[usize::from(n & 7)];
        let w = self.words[wi];
        let v = u64::from((w >> sh) as u8);
        if wi == 0 {
            self.words[0] = (w << 8 & moving) | (w & !moving) | v;
        } else {
            let carry = self.words[wi - 1] >> 56;
            self.words[wi] = (w << 8 & moving) | (w & !moving) | carry;
            for k in (1..wi).rev() {
                self.words[k] = self.words[k] << 8 | self.words[k - 1] >> 56;
            }
            self.words[0] = self.words[0] << 8 | v;
        }
        v as u8
    }
}

// ------------------------------------------------------------------- CRC

/// bzip2's CRC-32 (MSB first, polynomial 0x04c11db7) of `data`, slicing by 16.
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(16);
    for c in &mut chunks {
        let a = (crc ^ u32::from_be_bytes([c[0], c[1], c[2], c[3]])).to_be_bytes();
        crc = t[15][usize::from(a[0])] ^ t[14][usize::from(a[1])];
        crc ^= t[13][usize::from(a[2])] ^ t[12][usize::from(a[3])];
        for (k, &b) in c[4..].iter().enumerate() {
            crc ^= t[11 - k][usize::from(b)];
        }
    }
    for &b in chunks.remainder() {
        crc = crc << 8 ^ t[0][usize::from((crc >> 24) as u8 ^ b)];
    }
    !crc
}

/// Slicing-by-16 tables: `[k][b]` is the CRC update for byte `b` followed by
/// `k` zero bytes.
static CRC_TABLES: [[u32; 256]; 16] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 16] {
    let mut t = [[0u32; 256]; 16];
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
    while k < 16 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const EOS_MAGIC: u64 = 0x1772_4538_5090;

    use crate::feed::test_support::{Rng, compress};

    fn reference(bz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bzip2::read::MultiBzDecoder::new(bz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn bits_at(src: &[u8], bit: u64) -> u64 {
        let mut b = [0u8; 8];
        let i = (bit / 8) as usize;
        let n = src.len().saturating_sub(i).min(8);
        b[..n].copy_from_slice(&src[i..i + n]);
        (u64::from_be_bytes(b) << (bit % 8)) >> 16
    }

    /// Bit ranges of the blocks of a single-stream file (magics found by a
    /// plain scan; test data is too small for chance magics to matter).
    fn blocks(bz: &[u8]) -> Vec<Range<u64>> {
        let mut starts = Vec::new();
        let mut bit = 32;
        while bit + 48 <= bz.len() as u64 * 8 {
            match bits_at(bz, bit) {
                BLOCK_MAGIC => starts.push(bit),
                EOS_MAGIC => {
                    starts.push(bit);
                    break;
                }
                _ => {}
            }
            bit += 1;
        }
        starts.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// Decodes every block of `bz` with the fast decoder.
    fn decode_all(d: &mut BlockDecoder, bz: &[u8]) -> Vec<u8> {
        let level = bz[3] - b'0';
        let mut out = Vec::new();
        for b in blocks(bz) {
            d.decode(bz, b.clone(), level, &mut out)
                .unwrap_or_else(|e| panic!("block {b:?}: {e}"));
        }
        out
    }

    fn check_roundtrip(d: &mut BlockDecoder, data: &[u8], level: u32, what: &str) {
        let bz = compress(data, level);
        let out = decode_all(d, &bz);
        assert!(out == data, "{what}, level {level}: output differs");
        assert!(reference(&bz) == data);
    }

    /// JSON-lines-like text.
    fn json_lines(len: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng(seed | 1);
        let mut out = Vec::with_capacity(len + 300);
        while out.len() < len {
            let line = format!(
                "{{\"id\": \"{:016x}{:016x}\", \"type\": \"file_behaviour\", \"attributes\": \
                 {{\"registry_keys_set\": [{{\"key\": \"HKEY_CURRENT_USER\\\\Software\\\\{}\"}}], \
                 \"processes\": {}, \"tags\": [\"{}\"]}}}}\n",
                r.next(),
                r.next(),
                ["Microsoft", "Office", "Classes", "Policies"][r.below(4) as usize],
                r.below(100_000),
                ["DIRECT_CPU_CLOCK_ACCESS", "RUNTIME_MODULES", "    "][r.below(3) as usize],
            );
            out.extend_from_slice(line.as_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn crc_matches_the_bzip2_check_value() {
        assert_eq!(crc32(b"123456789"), 0xFC89_1918);
        assert_eq!(crc32(b""), 0);
        // Slicing and byte-wise paths agree at every length.
        let data = Rng(1).bytes(100);
        for n in 0..data.len() {
            let mut crc = !0u32;
            for &b in &data[..n] {
                crc = crc << 8 ^ CRC_TABLES[0][usize::from((crc >> 24) as u8 ^ b)];
            }
            assert_eq!(crc32(&data[..n]), !crc, "length {n}");
        }
    }

    #[test]
    fn all_levels_on_text_json_random_and_runs() {
        let mut d = BlockDecoder::new();
        let mut r = Rng(2);
        let json = json_lines(1_900_000, 3);
        let random = r.bytes(1_000_000);
        let mut runs = Vec::new();
        while runs.len() < 1_200_000 {
            let len = [1, 2, 3, 4, 5, 6, 254, 255, 258, 259, 260, 1000][r.below(12) as usize];
            runs.extend(std::iter::repeat_n(r.next() as u8 % 3, len));
        }
        for level in 1..=9 {
            check_roundtrip(&mut d, &json, level, "json lines");
            check_roundtrip(&mut d, &random[..300_000], level, "random");
            check_roundtrip(&mut d, &runs, level, "runs");
            check_roundtrip(&mut d, &vec![b'x'; 2_000_000], level, "all the same");
        }
        check_roundtrip(&mut d, &random, 9, "random, 1 MB");
    }

    #[test]
    fn initial_rle_edge_cases() {
        let mut d = BlockDecoder::new();
        // Runs of exactly 4 and 5, 4 + 255 and 4 + 255 + 1, at the start, in
        // the middle and at the end of a block; a count byte equal to the run.
        for len in [
            1, 3, 4, 5, 8, 9, 100, 258, 259, 260, 263, 264, 1000, 100_000,
        ] {
            for ch in [0u8, b'a', 4, 255] {
                let run = vec![ch; len];
                for data in [
                    run.clone(),
                    [&b"xyz"[..], &run].concat(),
                    [&run[..], b"xyz"].concat(),
                    [&b"q"[..], &run, b"q"].concat(),
                ] {
                    check_roundtrip(&mut d, &data, 1, &format!("run of {len} x {ch}"));
                }
            }
        }
        // A run whose count byte equals its byte (4 x 'a' then count 97).
        check_roundtrip(
            &mut d,
            &[b'a'; 4 + 97 + 4 + 97].repeat(3),
            1,
            "count = byte",
        );
        // All 256 byte values, in order and shuffled; one symbol only.
        let all: Vec<u8> = (0..=255).collect();
        check_roundtrip(&mut d, &all, 1, "256 symbols");
        check_roundtrip(&mut d, &all.repeat(5000), 9, "256 symbols x 5000");
        let mut r = Rng(4);
        let mut shuffled = all.repeat(40);
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, r.below(i as u64 + 1) as usize);
        }
        check_roundtrip(&mut d, &shuffled, 2, "shuffled");
        check_roundtrip(&mut d, b"z", 9, "one byte");
        check_roundtrip(&mut d, b"zz", 9, "two bytes");
    }

    #[test]
    fn undo_initial_rle_matches_a_naive_decoder() {
        fn naive(src: &[u8]) -> Option<Vec<u8>> {
            let (mut out, mut i, mut same) = (Vec::new(), 0, 0);
            while i < src.len() {
                let b = src[i];
                same = if out.last() == Some(&b) && same > 0 {
                    same + 1
                } else {
                    1
                };
                out.push(b);
                i += 1;
                if same == 4 {
                    let &n = src.get(i)?;
                    out.extend(std::iter::repeat_n(b, usize::from(n)));
                    (i, same) = (i + 1, 0);
                }
            }
            Some(out)
        }
        let mut r = Rng(5);
        for i in 0..3000 {
            let len = r.below(if i < 2000 { 20 } else { 400 }) as usize;
            let alphabet = 1 + r.below(3);
            let src: Vec<u8> = (0..len).map(|_| (r.below(alphabet)) as u8).collect();
            let mut out = Vec::new();
            let ours = undo_initial_rle(&src, &mut out).ok().map(|()| out);
            assert_eq!(ours, naive(&src), "{src:?}");
        }
    }

    #[test]
    fn move_to_front_matches_a_naive_list() {
        let mut alphabet = [0u8; 256];
        for (i, a) in alphabet.iter_mut().enumerate() {
            *a = (i as u8).wrapping_mul(37);
        }
        let mut naive = alphabet.to_vec();
        let mut mtf = Mtf::new(&alphabet);
        let mut r = Rng(6);
        for i in 0..20_000 {
            let n = if i % 2 == 0 {
                1 + r.below(255)
            } else {
                1 + r.below(12)
            } as usize;
            let v = naive.remove(n);
            naive.insert(0, v);
            assert_eq!(mtf.move_to_front(n as u8), v);
            assert_eq!(mtf.front(), v);
        }
        let list: Vec<u8> = mtf.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(list, naive);
    }

    #[test]
    fn huffman_tables_reject_over_subscribed_codes() {
        let mut t = HuffTable::EMPTY;
        assert!(t.build(&[1, 1, 1]).is_err());
        assert!(t.build(&[2, 2, 2, 2, 2]).is_err());
        // Complete: 1 + 2 + 3 + 3; incomplete: 2 + 2 + 2.
        t.build(&[1, 2, 3, 3]).unwrap();
        assert_eq!(t.decode(0b0 << 63).unwrap(), (0, 1));
        assert_eq!(t.decode(0b10 << 62).unwrap(), (1, 2));
        assert_eq!(t.decode(0b111 << 61).unwrap(), (3, 3));
        t.build(&[2, 2, 2]).unwrap();
        assert_eq!(t.decode(0b10 << 62).unwrap(), (2, 2));
        assert!(t.decode(0b11 << 62).is_err());
        // Long codes take the slow path: lengths 1, 2, .., 19, 20, 20.
        let lens: Vec<u8> = (1..=20).chain([20]).collect();
        t.build(&lens).unwrap();
        assert_eq!(t.decode(!0 << 44).unwrap(), (20, 20));
        assert_eq!(t.decode(!0 << 45).unwrap(), (19, 20));
        assert_eq!(t.decode(!0 << 53).unwrap(), (11, 12));
    }

    #[test]
    fn randomised_blocks_are_reported() {
        let bz = compress(b"hello hello hello", 9);
        let b = blocks(&bz).remove(0);
        let mut flipped = bz.clone();
        let bit = b.start + 48 + 32; // the randomised flag
        flipped[(bit / 8) as usize] ^= 0x80 >> (bit % 8);
        let mut out = Vec::new();
        let r = BlockDecoder::new().decode(&flipped, b, 9, &mut out);
        assert_eq!(r, Err(BlockError::Randomised));
        assert!(out.is_empty());
    }

    #[test]
    fn wrong_ranges_and_levels_are_errors() {
        let data = json_lines(50_000, 7);
        let bz = compress(&data, 1);
        let b = blocks(&bz).remove(0);
        let mut d = BlockDecoder::new();
        let mut out = b"kept".to_vec();
        for (range, level) in [
            (b.start + 1..b.end, 1),
            (b.start..b.end - 1, 1),
            (b.start..b.end + 1, 1),
            (b.start..bz.len() as u64 * 8 + 1, 1),
            (b.end..b.start, 1),
            (b.clone(), 0),
            (b.clone(), 10),
        ] {
            assert!(d.decode(&bz, range, level, &mut out).is_err());
            assert_eq!(out, b"kept");
        }
        // The block fits level 1, so any larger level accepts it too.
        let info = d.decode(&bz, b.clone(), 9, &mut out).unwrap();
        assert_eq!((info.len, &out[4..]), (data.len(), &data[..]));
    }

    /// Every result must be an error or exactly `want`; never a panic.
    fn fuzz_one(d: &mut BlockDecoder, bz: &[u8], range: Range<u64>, want: &[u8]) {
        let mut out = Vec::new();
        match d.decode(bz, range, 9, &mut out) {
            Ok(info) => assert!(out == want && info.len == want.len()),
            Err(_) => assert!(out.is_empty()),
        }
    }

    #[test]
    fn bit_flips_and_truncations_are_errors_or_exact() {
        let mut d = BlockDecoder::new();
        let mut r = Rng(8);
        let inputs = [
            json_lines(40_000, 9),
            [vec![7u8; 3000], json_lines(3000, 10), vec![9u8; 300]].concat(),
            r.bytes(5000),
        ];
        for data in &inputs {
            let bz = compress(data, 9);
            let b = blocks(&bz).remove(0);
            for i in 0..1500 {
                // Half the flips in the header and tables, where they hurt most.
                let span = if i % 2 == 0 { 2000 } else { b.end - b.start };
                let bit = b.start + r.below(span.min(b.end - b.start));
                let mut bad = bz.clone();
                bad[(bit / 8) as usize] ^= 0x80 >> (bit % 8);
                fuzz_one(&mut d, &bad, b.clone(), data);
                if i % 5 == 0 {
                    let mut bad2 = bad.clone();
                    let bit = b.start + r.below(b.end - b.start);
                    bad2[(bit / 8) as usize] ^= 0x80 >> (bit % 8);
                    fuzz_one(&mut d, &bad2, b.clone(), data);
                }
            }
            for cut in (b.start..b.end).step_by(97) {
                fuzz_one(&mut d, &bz, b.start..cut, data);
                fuzz_one(&mut d, &bz[..cut.div_ceil(8) as usize], b.start..cut, data);
            }
        }
    }

    #[test]
    fn random_garbage_is_rejected() {
        let mut d = BlockDecoder::new();
        let mut r = Rng(11);
        let magic = &BLOCK_MAGIC.to_be_bytes()[2..];
        for i in 0..20_000 {
            let len = r.below(if i % 2 == 0 { 100 } else { 3000 }) as usize;
            let mut g = r.bytes(len);
            if i % 4 > 0 {
                // A real magic, and mostly plausible header fields after it.
                g.splice(0..0, magic.iter().copied());
                if i % 4 == 2 && g.len() > 14 {
                    g[10] &= 0x7f; // not randomised
                    g[10..14].copy_from_slice(&[0, 0, 0, 0xff]);
                }
            }
            let end = g.len() as u64 * 8;
            let mut out = Vec::new();
            let level = 1 + r.below(9) as u8;
            assert!(d.decode(&g, 0..end, level, &mut out).is_err());
            assert!(out.is_empty());
        }
    }
}
