//! Parallel bzip2 decoding of feed batch files.
//!
//! Responsibility: turn one bzip2 file (one or more concatenated streams) read
//! incrementally from any `Read` into its decoded bytes, handed to a sink in
//! file order, using several cores *within* the file (pbzip2/lbzip2 style).
//!
//! How: a splitter thread reads the input and scans the bit stream for the
//! 48-bit block and end-of-stream magics (which sit at arbitrary bit offsets),
//! cuts out each block and re-frames it as a standalone single-block stream
//! ("BZh" + level, the block's bits re-aligned, end-of-stream magic, combined
//! CRC = block CRC). Worker threads decode those pieces with the block decoder
//! of [`super::bzblock`] (about twice libbz2's speed), which checks each block's
//! CRC; the calling thread checks each stream's combined CRC. A magic can occur by chance inside
//! compressed data: candidates are filtered (origPtr must be in range), and a
//! piece that fails to decode is merged with the following piece and retried
//! before the data is declared corrupt.
//!
//! Fallback: a piece the fast decoder rejects for any reason (bad data, CRC
//! mismatch, an unsupported randomised block, or a bug) is decoded again with
//! [`bzip2::Decompress`] (libbz2), and only if that fails too is it treated as
//! a false cut or corruption. So the fast decoder can cost time, never output;
//! [`DecodeStats::fallback_blocks`] counts the blocks libbz2 had to decode
//! (0 on healthy data).
//!
//! Order: the splitter sends, in file order, one one-shot result channel per
//! piece over a bounded "order" channel; the calling thread takes them in that
//! order and waits on each, so output order never depends on which worker
//! finishes first. The sink runs on the calling thread (it need not be `Send`).
//!
//! Memory: at most `max_in_flight` pieces exist at once (queued, being decoded,
//! decoded and waiting, or being handed to the sink; one more while repairing a
//! false block boundary), each at most one compressed block (<= ~1 MB for real
//! encoders, hard cap [`max_block_bytes`]) plus its decoded block (~0.9 MB
//! typical; up to ~46 MB for level 9 blocks of long runs, because of bzip2's
//! initial run-length coding). Add one fast block decoder per decoding thread
//! (8 MiB of arrays, of which only the level's block size is ever touched; kept
//! by the [`ParallelDecoder`] from one file to the next), up to 16 spare output
//! buffers of at most 2 MiB each ([`BufferPool`]), a libbz2 state (~3.6 MB at
//! level 9) only while falling back, and the read buffer (the current partial
//! block + 512 KiB).
//! So memory is independent of the file size. [`DecodeStats`] reports the
//! observed peaks.
//!
//! Threads: spawned per [`ParallelDecoder::decode`] call with
//! `std::thread::scope`. Calls are per batch file (a few per minute, each
//! decoding for seconds), so spawn cost (~tens of µs) is irrelevant, and scoped
//! threads guarantee that no thread outlives the call, also on errors.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};

use bzip2::{Decompress, Status};
use crossbeam_channel::{Receiver, Sender};

use super::bzblock::BlockDecoder;

/// Starts every block (BCD of pi).
const BLOCK_MAGIC: u64 = 0x3141_5926_5359;
/// Ends every stream (BCD of sqrt(pi)), followed by the combined CRC.
const EOS_MAGIC: u64 = 0x1772_4538_5090;
/// The low 48 bits.
const MASK48: u64 = (1 << 48) - 1;
/// Most merges of a failed piece with its successors before it is corrupt.
const MAX_MERGES: u32 = 4;
/// Bytes requested from the input per read.
const READ_CHUNK: usize = 512 * 1024;

/// Hard cap on one compressed block at `level`: 20-bit codes for each of the
/// <= level*100k symbols plus generous room for tables. Real encoders stay far
/// below; a longer gap between magics is reported as corruption.
pub fn max_block_bytes(level: u8) -> u64 {
    u64::from(level) * 250_000 + 256 * 1024
}

/// Statistics of one successful decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Compressed bytes read from the input.
    pub compressed_bytes: u64,
    /// Decoded bytes handed to the sink.
    pub decoded_bytes: u64,
    /// bzip2 streams decoded (0 from [`decode_sequential`], which cannot see them).
    pub streams: u32,
    /// bzip2 blocks decoded (0 from [`decode_sequential`]).
    pub blocks: u64,
    /// Most pieces (blocks) alive at once; never above `max_in_flight` (+1 while
    /// repairing a false block boundary).
    pub peak_pieces_in_flight: usize,
    /// Largest capacity of the compressed read buffer, in bytes.
    pub peak_read_buffer: usize,
    /// Blocks the fast block decoder rejected and libbz2 decoded (see the module
    /// doc); 0 on healthy data, so anything else is worth a look.
    pub fallback_blocks: u64,
}

/// Why decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError<E> {
    /// Reading the input failed.
    #[error("reading bzip2 input: {0}")]
    Io(#[from] io::Error),
    /// The input does not start with a bzip2 stream header (includes empty input).
    #[error("input is not bzip2 (bad or missing stream header)")]
    NotBzip2,
    /// The input ends inside a stream.
    #[error("bzip2 input is truncated")]
    Truncated,
    /// A block or stream fails to decode or its CRC does not match.
    #[error("corrupt bzip2 data: {0}")]
    Corrupt(String),
    /// Bytes after the last complete stream do not start another stream.
    /// (`MultiBzDecoder` also fails there, with an `InvalidInput` i/o error.)
    #[error("garbage after the last bzip2 stream")]
    TrailingGarbage,
    /// The sink returned this error; decoding stopped.
    #[error("decoding stopped by the output sink")]
    Stopped(E),
}

/// Internal error type: `Stopped(())` means the consumer has gone away.
type Internal = DecodeError<()>;

/// Converts an internal error into the caller's error type.
fn widen<E>(e: Internal) -> DecodeError<E> {
    match e {
        DecodeError::Io(e) => DecodeError::Io(e),
        DecodeError::NotBzip2 => DecodeError::NotBzip2,
        DecodeError::Truncated => DecodeError::Truncated,
        DecodeError::Corrupt(m) => DecodeError::Corrupt(m),
        DecodeError::TrailingGarbage => DecodeError::TrailingGarbage,
        DecodeError::Stopped(()) => DecodeError::Corrupt("internal: decoding aborted".into()),
    }
}

// ---------------------------------------------------------------- bit helpers

/// Reads `n` (1..=56) bits starting at bit `bit` of `src` (MSB first); bits
/// past the end read as 0.
fn read_bits(src: &[u8], bit: u64, n: u32) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = src.get((bit / 8) as usize..) {
        let a = s.len().min(8);
        b[..a].copy_from_slice(&s[..a]);
    }
    (u64::from_be_bytes(b) << (bit % 8)) >> (64 - n)
}

/// Bitmap over u16 values: can these two bytes lie inside a magic, at byte
/// offset 1 or 2 from the byte where it starts, for any of the 8 bit shifts?
static PREFILTER: LazyLock<[u64; 1024]> = LazyLock::new(|| {
    let mut t = [0u64; 1024];
    for m in [BLOCK_MAGIC, EOS_MAGIC] {
        for (s, d) in (0..8).flat_map(|s| [(s, 1), (s, 2)]) {
            let v = ((m << (16 - s)) >> (48 - 8 * d)) & 0xFFFF;
            t[v as usize / 64] |= 1 << (v % 64);
        }
    }
    t
});

/// A magic starting in byte `i` at a bit >= `from` that fits in `buf`.
fn magic_at(buf: &[u8], i: usize, from: u64) -> Option<(u64, u64)> {
    let w = read_bits(buf, i as u64 * 8, 56) << 8;
    (0..8).find_map(|s| {
        let (bit, v) = (i as u64 * 8 + s, (w >> (16 - s)) & MASK48);
        let fits = bit + 48 <= buf.len() as u64 * 8;
        ((v == BLOCK_MAGIC || v == EOS_MAGIC) && bit >= from && fits).then_some((bit, v))
    })
}

/// First block or end-of-stream magic at bit >= `from` lying wholly in `buf`:
/// (bit offset, magic). Every magic covers bytes i+1..=i+3 of its start byte i,
/// so testing the u16 at every even offset against [`PREFILTER`] catches all of
/// them at ~0.5 table lookups per byte; hits are verified bit by bit.
fn find_magic(buf: &[u8], from: u64) -> Option<(u64, u64)> {
    let first = (from / 8) as usize;
    let j0 = (first + 3) & !1; // first even offset >= first + 2
    if let Some(hit) = (first..j0 - 2).find_map(|i| magic_at(buf, i, from)) {
        return Some(hit);
    }
    let (tail, table) = (buf.get(j0..)?, &*PREFILTER);
    for (k, pair) in tail.chunks_exact(2).enumerate() {
        let v = usize::from(u16::from_be_bytes([pair[0], pair[1]]));
        if table[v >> 6] >> (v & 63) & 1 != 0 {
            let j = j0 + 2 * k;
            if let Some(hit) = (j - 2..j).find_map(|i| magic_at(buf, i, from)) {
                return Some(hit);
            }
        }
    }
    None
}

/// Bit-level appender (MSB first).
struct BitWriter {
    /// Completed bytes.
    out: Vec<u8>,
    /// Pending bits, the last `n` of them not yet in `out`.
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends the low `n` (<= 56) bits of `v`.
    fn put(&mut self, v: u64, n: u32) {
        self.acc = (self.acc << n) | (v & ((1 << n) - 1));
        self.n += n;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
    }

    /// Appends bits `bit..bit + n` of `src`; whole bytes at a time when aligned.
    fn put_bits(&mut self, src: &[u8], mut bit: u64, mut n: u64) {
        if self.n == 0 {
            let (i, k, full) = ((bit / 8) as usize, (bit % 8) as u32, (n / 8) as usize);
            let a = &src[i..i + full];
            if k == 0 {
                self.out.extend_from_slice(a);
            } else {
                let b = &src[i + 1..i + full + 1];
                self.out
                    .extend(a.iter().zip(b).map(|(&x, &y)| x << k | y >> (8 - k)));
            }
            bit += full as u64 * 8;
            n -= full as u64 * 8;
        }
        while n > 0 {
            let take = n.min(32) as u32;
            self.put(read_bits(src, bit, take), take);
            bit += u64::from(take);
            n -= u64::from(take);
        }
    }
}

// ------------------------------------------------------------- block framing

/// Compressed bits of one or more consecutive blocks (normally exactly one),
/// framed as a standalone single-block stream that libbz2 can decode.
struct Piece {
    /// Block size level '1'..'9' of the stream, as a number.
    level: u8,
    /// "BZh"+level, the piece's bits, end-of-stream magic, `crc`, zero padding.
    framed: Vec<u8>,
    /// Length of the original bits (starting with the block magic).
    nbits: u64,
    /// Block CRC stored after the leading block magic.
    crc: u32,
}

impl Piece {
    /// Frames the concatenation of `segs` (source, first bit, bit count).
    fn frame(level: u8, segs: &[(&[u8], u64, u64)]) -> Piece {
        let nbits = segs.iter().map(|s| s.2).sum::<u64>();
        let mut w = BitWriter {
            out: Vec::with_capacity((nbits / 8 + 16) as usize),
            acc: 0,
            n: 0,
        };
        w.put(
            u64::from_be_bytes([0, 0, 0, 0, b'B', b'Z', b'h', b'0' + level]),
            32,
        );
        for &(src, bit, n) in segs {
            w.put_bits(src, bit, n);
        }
        let crc = read_bits(&w.out, 32 + 48, 32) as u32; // after the block magic
        w.put(EOS_MAGIC, 48);
        w.put(u64::from(crc), 32);
        w.put(0, 7);
        Piece {
            level,
            framed: w.out,
            nbits,
            crc,
        }
    }

    /// This piece followed by `next` (undoing a cut at a false magic).
    fn merge(&self, next: &Piece) -> Piece {
        Piece::frame(
            self.level,
            &[
                (&self.framed, 32, self.nbits),
                (&next.framed, 32, next.nbits),
            ],
        )
    }

    /// Decodes the piece with the fast block decoder `fast` or, if that
    /// rejects it, with libbz2; `Failed` if both do.
    fn decode(self, fast: &mut BlockDecoder, mut out: Vec<u8>) -> Decoded {
        let bits = 32..32 + self.nbits;
        let fast = fast.decode(&self.framed, bits, self.level, &mut out);
        if fast.is_ok_and(|block| block.crc == self.crc) {
            return Decoded::Ok {
                crc: self.crc,
                out,
                fallback: false,
            };
        }
        match self.decode_libbz2() {
            Ok(out) => Decoded::Ok {
                crc: self.crc,
                out,
                fallback: true,
            },
            Err(()) => Decoded::Failed(self),
        }
    }

    /// Decodes the piece with libbz2; Err if it rejects it (bad data or block
    /// CRC) or it does not end exactly at its end-of-stream marker.
    fn decode_libbz2(&self) -> Result<Vec<u8>, ()> {
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(usize::from(self.level) * 110_000);
        let mut input = &self.framed[..];
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.len());
            }
            let (in0, out0) = (d.total_in(), d.total_out());
            let status = d.decompress_vec(input, &mut out).map_err(drop)?;
            input = &input[(d.total_in() - in0) as usize..];
            match status {
                Status::StreamEnd if input.is_empty() => return Ok(out),
                Status::Ok if d.total_in() > in0 || d.total_out() > out0 => {}
                _ => return Err(()),
            }
        }
    }
}

// ------------------------------------------------------------------ splitter

/// Incremental input buffer addressed by absolute byte/bit offsets.
struct Input<R> {
    inner: R,
    /// Bytes from the oldest still-needed position on.
    buf: Vec<u8>,
    /// Absolute offset of `buf[0]`.
    base: u64,
    eof: bool,
    read: u64,
    peak: usize,
}

impl<R: Read> Input<R> {
    /// Absolute offset just past the buffered bytes.
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Reads one more chunk, first dropping bytes before absolute `keep`.
    /// Ok(false) at end of input.
    fn more(&mut self, keep: u64) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let drop = (keep.saturating_sub(self.base) as usize).min(self.buf.len());
        self.buf.drain(..drop);
        self.base += drop as u64;
        let old = self.buf.len();
        self.buf.reserve_exact(READ_CHUNK);
        self.buf.resize(old + READ_CHUNK, 0);
        let r = loop {
            match self.inner.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.buf.truncate(old + *r.as_ref().unwrap_or(&0));
        let n = r?;
        self.eof = n == 0;
        self.read += n as u64;
        self.peak = self.peak.max(self.buf.capacity());
        Ok(n > 0)
    }

    /// Buffers bytes up to absolute `end`; Ok(false) if the input ends first.
    fn need(&mut self, end: u64, keep: u64) -> io::Result<bool> {
        while self.end() < end {
            if !self.more(keep)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `n` buffered bits at absolute bit offset `bit`.
    fn bits(&self, bit: u64, n: u32) -> u64 {
        read_bits(&self.buf, bit - self.base * 8, n)
    }

    /// Up to 4 buffered bytes at absolute `pos`.
    fn header(&self, pos: u64) -> &[u8] {
        let s = self.buf.get((pos - self.base) as usize..).unwrap_or(&[]);
        &s[..s.len().min(4)]
    }

    /// Next magic at bit >= `from` of the block starting at bit `start`.
    fn next_magic(&mut self, mut from: u64, start: u64, level: u8) -> Result<(u64, u64), Internal> {
        let too_long = || {
            DecodeError::Corrupt(format!(
                "no block boundary within {} bytes",
                max_block_bytes(level)
            ))
        };
        loop {
            if let Some((bit, magic)) = find_magic(&self.buf, from - self.base * 8) {
                let bit = bit + self.base * 8;
                return if bit - start > max_block_bytes(level) * 8 {
                    Err(too_long())
                } else {
                    Ok((bit, magic))
                };
            }
            from = from.max(self.end().saturating_sub(8) * 8);
            if from - start > max_block_bytes(level) * 8 {
                return Err(too_long());
            }
            if !self.more(start / 8)? {
                return Err(DecodeError::Truncated);
            }
        }
    }
}

/// What the splitter produces, in file order.
enum Event {
    /// One block, framed.
    Piece(Piece),
    /// End of a stream, with the stored combined CRC.
    StreamEnd(u32),
}

/// Is `h` a stream header "BZh1".."BZh9"?
fn is_header(h: &[u8]) -> bool {
    h.len() == 4 && h.starts_with(b"BZh") && (b'1'..=b'9').contains(&h[3])
}

/// Splits the whole input into pieces and stream ends, passed to `emit`.
fn split<R: Read>(
    inp: &mut Input<R>,
    emit: &mut dyn FnMut(Event) -> Result<(), Internal>,
) -> Result<(), Internal> {
    let (mut pos, mut streams) = (0, 0);
    loop {
        let full = inp.need(pos + 4, pos)?;
        let h = inp.header(pos);
        if !full || !is_header(h) {
            let prefix = h.iter().zip(b"BZh").all(|(a, b)| a == b) && !full;
            return match (streams, h.is_empty(), prefix) {
                (0, _, _) => Err(DecodeError::NotBzip2),
                (_, true, _) => Ok(()),
                (_, _, true) => Err(DecodeError::Truncated),
                _ => Err(DecodeError::TrailingGarbage),
            };
        }
        let level = h[3] - b'0';
        pos = split_stream(inp, level, (pos + 4) * 8, emit)?;
        streams += 1;
    }
}

/// Splits one stream whose first block (or end marker) is at bit `first`;
/// returns the byte offset just after the stream.
fn split_stream<R: Read>(
    inp: &mut Input<R>,
    level: u8,
    first: u64,
    emit: &mut dyn FnMut(Event) -> Result<(), Internal>,
) -> Result<u64, Internal> {
    if !inp.need((first + 80).div_ceil(8), first / 8)? {
        return Err(DecodeError::Truncated);
    }
    match inp.bits(first, 48) {
        EOS_MAGIC => {
            emit(Event::StreamEnd(inp.bits(first + 48, 32) as u32))?;
            return Ok((first + 80).div_ceil(8));
        }
        BLOCK_MAGIC => {}
        _ => {
            return Err(DecodeError::Corrupt(
                "no block header after stream header".into(),
            ));
        }
    }
    let (mut start, mut from, mut fold) = (first, first + 80, 0u32);
    loop {
        let (q, magic) = inp.next_magic(from, start, level)?;
        from = q + 1;
        let keep = start / 8;
        let cut =
            |inp: &Input<R>| Piece::frame(level, &[(&inp.buf, start - inp.base * 8, q - start)]);
        if magic == BLOCK_MAGIC {
            // Filter chance magics: libbz2 rejects origPtr > 10 + level * 100000.
            if !inp.need((q + 105).div_ceil(8), keep)?
                || inp.bits(q + 81, 24) > 10 + 100_000 * u64::from(level)
            {
                continue;
            }
            let piece = cut(inp);
            fold = fold.rotate_left(1) ^ piece.crc;
            emit(Event::Piece(piece))?;
            (start, from) = (q, q + 80);
        } else {
            // Accept an end-of-stream magic if the stored CRC matches the blocks
            // seen, or if the end of input or another stream header follows.
            let end = (q + 80).div_ceil(8);
            if !inp.need(end, keep)? {
                continue;
            }
            let stored = inp.bits(q + 48, 32) as u32;
            let crc_ok = fold.rotate_left(1) ^ inp.bits(start + 48, 32) as u32 == stored;
            if !crc_ok
                && !(if inp.need(end + 4, keep)? {
                    is_header(inp.header(end))
                } else {
                    inp.end() == end
                })
            {
                continue;
            }
            emit(Event::Piece(cut(inp)))?;
            emit(Event::StreamEnd(stored))?;
            return Ok(end);
        }
    }
}

// ------------------------------------------------------------------ pipeline

/// Order-channel entry, in file order.
enum Item {
    /// A piece, decoded (or not) when its worker answers.
    Piece(Receiver<Decoded>),
    /// End of a stream, with the stored combined CRC.
    StreamEnd(u32),
    /// The splitter failed here; nothing follows.
    Fail(Internal),
    /// The input ended cleanly after `read` bytes.
    End { read: u64, peak_buffer: usize },
}

/// A worker's answer for one piece; a failed piece is handed back for merging.
enum Decoded {
    /// Decoded bytes of a block with this CRC; `fallback` if libbz2 decoded it.
    Ok {
        crc: u32,
        out: Vec<u8>,
        fallback: bool,
    },
    /// Both decoders rejected the piece.
    Failed(Piece),
}

/// Decoded chunks handed back for reuse: a fresh ~1 MB buffer per block would
/// be paged in (and zeroed by the kernel) every time.
#[derive(Debug, Default)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers kept: more than are ever in flight between decoder and sink.
    const KEEP: usize = 16;
    /// Larger buffers (blocks of long runs) are freed, not kept.
    const MAX_CAPACITY: usize = 2 << 20;

    fn take(&self) -> Vec<u8> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        spare.pop().unwrap_or_default()
    }

    /// Keeps `buf` (emptied) for a later block, unless enough are kept.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() > Self::MAX_CAPACITY {
            return;
        }
        buf.clear();
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < Self::KEEP {
            spare.push(buf);
        }
    }
}

/// A piece to decode and where to send the answer.
type Job = (Piece, Sender<Decoded>);

/// Decodes bzip2 files on several threads, one file at a time.
#[derive(Debug)]
pub struct ParallelDecoder {
    /// Decoding threads.
    threads: usize,
    /// Most pieces alive at once (>= 2).
    max_in_flight: usize,
    /// Block decoders kept between calls: their work arrays stay allocated
    /// and paged in, instead of being faulted in again for every file.
    decoders: Mutex<Vec<BlockDecoder>>,
    /// Output buffers, handed back by the sink's side for reuse.
    buffers: Arc<BufferPool>,
    /// Test hook: cut every piece at this bit too, like a false magic would.
    #[cfg(test)]
    split_at: Option<u64>,
}

impl ParallelDecoder {
    /// A decoder using `threads` (at least 1) decoding threads, besides a light
    /// splitter thread and the calling thread, which runs the sink.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        ParallelDecoder {
            threads,
            max_in_flight: 2 * threads + 2,
            decoders: Mutex::new(Vec::new()),
            buffers: Arc::default(),
            #[cfg(test)]
            split_at: None,
        }
    }

    /// Sets how many blocks may be in flight (read but not yet consumed by the
    /// sink); at least 2, default `2 * threads + 2`. Bounds memory, see module doc.
    pub fn with_max_in_flight(mut self, blocks: usize) -> Self {
        self.max_in_flight = blocks.max(2);
        self
    }

    /// Where the sink's side hands decoded chunks back once done with them.
    pub fn buffers(&self) -> Arc<BufferPool> {
        self.buffers.clone()
    }

    fn take_decoder(&self) -> BlockDecoder {
        let mut pool = self.decoders.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_default()
    }

    /// Decodes every stream of a bzip2 file read incrementally from `input`,
    /// handing decoded chunks (one per block) to `sink` strictly in file order.
    /// Stops early and returns `DecodeError::Stopped(e)` if `sink` returns
    /// `Err(e)`; all threads have exited when this returns (a splitter blocked
    /// in `input.read` is waited for).
    pub fn decode<R: Read + Send, E>(
        &self,
        input: R,
        mut sink: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<DecodeStats, DecodeError<E>> {
        // The splitter holds one piece and the consumer one; the rest queue.
        let (order_tx, order_rx) = crossbeam_channel::bounded(self.max_in_flight - 2);
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        let (stop, live, peak) = (
            AtomicBool::new(false),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.threads)
                .map(|_| {
                    let (jobs, stop) = (job_rx.clone(), &stop);
                    s.spawn(move || {
                        let mut fast = self.take_decoder();
                        for (piece, tx) in jobs {
                            if stop.load(Relaxed) {
                                continue;
                            }
                            let _ = tx.send(piece.decode(&mut fast, self.buffers.take()));
                        }
                        self.decoders
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(fast);
                    })
                })
                .collect();
            drop(job_rx);
            let splitter =
                s.spawn(|| self.run_splitter(input, order_tx, job_tx, &stop, &live, &peak));
            let result = consume(order_rx, &mut sink, &live);
            stop.store(true, Relaxed); // order_rx is dropped: the splitter's next send fails
            let _ = splitter.join(); // a panic already surfaced as a missing End/result
            workers.into_iter().for_each(|w| _ = w.join());
            result.map(|mut st| {
                st.peak_pieces_in_flight = peak.load(Relaxed);
                st
            })
        })
    }

    /// Splitter thread: reads and splits `input`, queues jobs for the workers
    /// and their answer channels, in order, for the calling thread.
    fn run_splitter<R: Read>(
        &self,
        input: R,
        order: Sender<Item>,
        jobs: Sender<Job>,
        stop: &AtomicBool,
        live: &AtomicUsize,
        peak: &AtomicUsize,
    ) {
        let gone = |_| DecodeError::Stopped(());
        let send_piece = |p: Piece| -> Result<(), Internal> {
            let n = live.fetch_add(1, Relaxed) + 1;
            peak.fetch_max(n, Relaxed);
            let (tx, rx) = crossbeam_channel::bounded(1);
            order.send(Item::Piece(rx)).map_err(gone)?;
            jobs.send((p, tx)).map_err(|_| DecodeError::Stopped(()))
        };
        let mut emit = |ev: Event| -> Result<(), Internal> {
            if stop.load(Relaxed) {
                return Err(DecodeError::Stopped(()));
            }
            match ev {
                #[cfg(test)]
                Event::Piece(p) if self.split_at.is_some_and(|k| k + 80 < p.nbits) => {
                    let k = self.split_at.unwrap_or(0);
                    send_piece(Piece::frame(p.level, &[(&p.framed, 32, k)]))?;
                    send_piece(Piece::frame(p.level, &[(&p.framed, 32 + k, p.nbits - k)]))
                }
                Event::Piece(p) => send_piece(p),
                Event::StreamEnd(crc) => order.send(Item::StreamEnd(crc)).map_err(gone),
            }
        };
        let mut inp = Input {
            inner: input,
            buf: Vec::new(),
            base: 0,
            eof: false,
            read: 0,
            peak: 0,
        };
        let last = match split(&mut inp, &mut emit) {
            Ok(()) => Item::End {
                read: inp.read,
                peak_buffer: inp.peak,
            },
            Err(DecodeError::Stopped(())) => return,
            Err(e) => Item::Fail(e),
        };
        let _ = order.send(last);
    }
}

/// Calling-thread side: takes pieces in file order, repairs false cuts, checks
/// stream CRCs and feeds the sink.
fn consume<E>(
    order: Receiver<Item>,
    sink: &mut impl FnMut(Vec<u8>) -> Result<(), E>,
    live: &AtomicUsize,
) -> Result<DecodeStats, DecodeError<E>> {
    let internal = |what: &str| DecodeError::Corrupt(format!("internal: {what} thread exited"));
    let recv = |rx: Receiver<Decoded>| rx.recv().map_err(|_| internal("decoder"));
    let mut stats = DecodeStats::default();
    let mut fold = 0u32;
    loop {
        match order.recv().map_err(|_| internal("splitter"))? {
            Item::Piece(rx) => {
                let (mut res, mut merges) = (recv(rx)?, 0);
                let (crc, out) = loop {
                    let failed = match res {
                        Decoded::Ok { crc, out, fallback } => {
                            stats.fallback_blocks += u64::from(fallback);
                            break (crc, out);
                        }
                        Decoded::Failed(p) => p,
                    };
                    let bad = || {
                        DecodeError::Corrupt(format!(
                            "block {} of stream {} does not decode",
                            stats.blocks,
                            stats.streams + 1
                        ))
                    };
                    // Maybe the cut after `failed` was a chance magic: merge and retry.
                    let next = match order.recv() {
                        Ok(Item::Piece(rx)) => recv(rx)?,
                        Ok(Item::Fail(e)) => return Err(widen(e)),
                        _ => return Err(bad()),
                    };
                    live.fetch_sub(1, Relaxed);
                    let Decoded::Failed(next) = next else {
                        return Err(bad());
                    };
                    // Chance magics are ~1e-15/bit: more than a few in one block
                    // means corruption (and bounds the quadratic merge cost).
                    merges += 1;
                    let len = (failed.nbits + next.nbits) / 8;
                    if merges > MAX_MERGES || len > max_block_bytes(failed.level) {
                        return Err(bad());
                    }
                    res = failed
                        .merge(&next)
                        .decode(&mut BlockDecoder::new(), Vec::new());
                };
                fold = fold.rotate_left(1) ^ crc;
                stats.blocks += 1;
                stats.decoded_bytes += out.len() as u64;
                let r = if out.is_empty() { Ok(()) } else { sink(out) };
                live.fetch_sub(1, Relaxed);
                r.map_err(DecodeError::Stopped)?;
            }
            Item::StreamEnd(stored) => {
                stats.streams += 1;
                if stored != fold {
                    return Err(DecodeError::Corrupt(format!(
                        "stream {} CRC mismatch",
                        stats.streams
                    )));
                }
                fold = 0;
            }
            Item::Fail(e) => return Err(widen(e)),
            Item::End { read, peak_buffer } => {
                stats.compressed_bytes = read;
                stats.peak_read_buffer = peak_buffer;
                return Ok(stats);
            }
        }
    }
}

/// Same contract as [`ParallelDecoder::decode`], single-threaded, via
/// `bzip2::read::MultiBzDecoder` (reference and fallback), in chunks of
/// `chunk_size` bytes. Errors are mapped from its i/o errors: a bad magic is
/// `NotBzip2` if nothing was decoded yet, else `TrailingGarbage`.
pub fn decode_sequential<R: Read, E>(
    input: R,
    chunk_size: usize,
    mut sink: impl FnMut(Vec<u8>) -> Result<(), E>,
) -> Result<DecodeStats, DecodeError<E>> {
    struct Counting<R>(R, u64);
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    let mut dec = bzip2::read::MultiBzDecoder::new(Counting(input, 0));
    let mut stats = DecodeStats::default();
    loop {
        let mut chunk = vec![0; chunk_size.max(1)];
        let mut filled = 0;
        while filled < chunk.len() {
            match dec.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let magic = e.get_ref().and_then(|i| i.downcast_ref::<bzip2::Error>());
                    return Err(match (e.kind(), magic) {
                        (k, None) if k != io::ErrorKind::UnexpectedEof => DecodeError::Io(e),
                        _ if dec.get_ref().1 == 0 => DecodeError::NotBzip2,
                        (io::ErrorKind::UnexpectedEof, _) => DecodeError::Truncated,
                        (_, Some(bzip2::Error::DataMagic))
                            if stats.decoded_bytes + filled as u64 == 0 =>
                        {
                            DecodeError::NotBzip2
                        }
                        (_, Some(bzip2::Error::DataMagic)) => DecodeError::TrailingGarbage,
                        (_, Some(e)) => DecodeError::Corrupt(e.to_string()),
                        _ => DecodeError::Io(e),
                    });
                }
            }
        }
        if filled == 0 {
            stats.compressed_bytes = dec.get_ref().1;
            return Ok(stats);
        }
        chunk.truncate(filled);
        stats.decoded_bytes += filled as u64;
        sink(chunk).map_err(DecodeError::Stopped)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::feed::test_support::{Rng, compress};

    /// JSON-lines-like text with some entropy.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut r = Rng(seed | 1);
        let words = [
            "\"key\": ",
            "HKEY_LOCAL_MACHINE\\\\",
            "{\"id\": \"",
            "\"}, ",
            "process",
            "\n",
        ];
        let mut out = Vec::with_capacity(len + 64);
        while out.len() < len {
            if r.below(3) == 0 {
                out.extend_from_slice(format!("{:x}", r.next()).as_bytes());
            } else {
                out.extend_from_slice(words[r.below(words.len() as u64) as usize].as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    fn reference(bz: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        bzip2::read::MultiBzDecoder::new(bz)
            .read_to_end(&mut out)
            .ok()
            .map(|_| out)
    }

    fn run(d: &ParallelDecoder, bz: &[u8]) -> Result<(Vec<u8>, DecodeStats), DecodeError<()>> {
        let mut out = Vec::new();
        let stats = d.decode(bz, |c| {
            out.extend_from_slice(&c);
            Ok(())
        })?;
        Ok((out, stats))
    }

    fn par(bz: &[u8], threads: usize) -> Result<Vec<u8>, DecodeError<()>> {
        run(&ParallelDecoder::new(threads), bz).map(|r| r.0)
    }

    /// Our result must be an error, or exactly what MultiBzDecoder returns.
    fn check_vs_reference(bz: &[u8], threads: usize) {
        match (par(bz, threads), reference(bz)) {
            (Ok(ours), Some(theirs)) => assert!(ours == theirs, "output differs"),
            (Ok(_), None) => panic!("decoded input that MultiBzDecoder rejects"),
            (Err(e), Some(_)) => panic!("MultiBzDecoder accepts what we reject: {e:?}"),
            (Err(_), None) => {}
        }
    }

    #[test]
    fn all_levels_and_thread_counts_match_reference() {
        let data = text(700_000, 1);
        for level in 1..=9 {
            let bz = compress(&data, level);
            for threads in [1, 2, 3] {
                let (out, st) = run(&ParallelDecoder::new(threads), &bz).unwrap();
                assert!(out == data, "level {level} threads {threads}");
                assert_eq!((st.streams, st.compressed_bytes), (1, bz.len() as u64));
                assert_eq!(st.blocks, 700_000u64.div_ceil(level as u64 * 100_000 - 19));
                assert_eq!(st.fallback_blocks, 0);
            }
        }
    }

    #[test]
    fn fast_decoder_handles_every_kind_of_data_without_fallback() {
        let mut r = Rng(15);
        let random: Vec<u8> = (0..400_000).map(|_| r.next() as u8).collect();
        let mut runs = Vec::new();
        while runs.len() < 3_000_000 {
            let len = [1, 4, 5, 259, 260, 5000, 70_000][r.below(7) as usize];
            runs.extend(std::iter::repeat_n(r.next() as u8, len));
        }
        let all_bytes: Vec<u8> = (0..=255).collect();
        for (what, data) in [
            ("text", text(450_000, 16)),
            ("random", random),
            ("runs", runs),
            ("all the same", vec![b'a'; 1_000_000]),
            ("256 symbols", all_bytes.repeat(1000)),
            ("period 3", b"abc".repeat(300_000)),
            ("period 997", r.bytes(997).repeat(800)),
            ("one byte", b"a".to_vec()),
        ] {
            for level in [1, 2, 5, 9] {
                let bz = compress(&data, level);
                let (out, st) = run(&ParallelDecoder::new(2), &bz).unwrap();
                assert!(out == data, "{what}, level {level}");
                assert_eq!(reference(&bz).unwrap(), data);
                assert_eq!(st.fallback_blocks, 0, "{what}, level {level}");
            }
        }
    }

    #[test]
    fn blocks_the_fast_decoder_rejects_fall_back_to_libbz2() {
        // A randomised block (bzip2 0.9.0) shorter than 618 bytes decodes to the
        // same bytes as a plain one (the first flip is at byte 618), so setting
        // the flag keeps the file valid; the fast decoder refuses it.
        let data = text(500, 17);
        let mut bz = compress(&data, 9);
        bz[14] |= 0x80; // bit 112 = 32 (header) + 48 (magic) + 32 (CRC)
        assert_eq!(reference(&bz).unwrap(), data);
        let two = [&bz[..], &compress(&data, 9)].concat();
        for threads in [1, 2] {
            let (out, st) = run(&ParallelDecoder::new(threads), &two).unwrap();
            assert!(out == [&data[..], &data].concat());
            assert_eq!((st.blocks, st.fallback_blocks), (2, 1));
        }
    }

    #[test]
    fn multi_stream_tiny_and_empty_streams() {
        let (a, b) = (text(250_000, 2), text(10, 3));
        let mut bz = compress(&a, 1);
        bz.extend(compress(b"", 9));
        bz.extend(compress(&b, 9));
        bz.extend(compress(b"x", 5));
        bz.extend(compress(&a, 3));
        let want = [&a[..], &b, b"x", &a].concat();
        for threads in [1, 2] {
            let (out, st) = run(&ParallelDecoder::new(threads), &bz).unwrap();
            assert!(out == want);
            assert_eq!((st.streams, st.blocks), (5, 3 + 1 + 1 + 1));
            assert_eq!(st.fallback_blocks, 0);
        }
        assert_eq!(reference(&bz).unwrap(), want);
        assert_eq!(par(&compress(b"", 1), 2).unwrap(), b"");
        assert_eq!(par(&compress(b"a", 1), 2).unwrap(), b"a");
    }

    #[test]
    fn long_runs_decode_to_blocks_larger_than_900k() {
        let mut r = Rng(7);
        let mut data = vec![b'a'; 12_000_000];
        for _ in 0..3000 {
            let (at, len) = (r.below(11_000_000) as usize, r.below(5000) as usize);
            data[at..at + len].fill(r.next() as u8);
        }
        let bz = compress(&data, 9);
        let (out, st) = run(&ParallelDecoder::new(2), &bz).unwrap();
        assert!(out == data);
        assert!(st.decoded_bytes / st.blocks > 2_000_000, "{st:?}");
    }

    #[test]
    fn header_and_trailer_errors() {
        #[derive(Debug)]
        struct OnlyDebug;
        fn is_error<T: std::error::Error + Send + Sync + 'static>() {}
        is_error::<DecodeError<OnlyDebug>>();
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let par_io = ParallelDecoder::new(2).decode(Failing, |_| Ok::<_, ()>(()));
        assert!(matches!(par_io, Err(DecodeError::Io(_))));
        let seq_io = decode_sequential(Failing, 100, |_| Ok::<_, ()>(()));
        assert!(matches!(seq_io, Err(DecodeError::Io(_))));

        let bz = compress(&text(50_000, 4), 9);
        let err = |input: &[u8]| par(input, 2).unwrap_err();
        assert!(matches!(err(b""), DecodeError::NotBzip2));
        assert!(matches!(err(b"BZ"), DecodeError::NotBzip2));
        assert!(matches!(err(b"hello world"), DecodeError::NotBzip2));
        assert!(matches!(err(b"BZh0xxxxxxxxxx"), DecodeError::NotBzip2));
        assert!(matches!(
            err(&[&bz[..], b"junk"].concat()),
            DecodeError::TrailingGarbage
        ));
        assert!(matches!(
            err(&[&bz[..], b"\0"].concat()),
            DecodeError::TrailingGarbage
        ));
        assert!(matches!(
            err(&[&bz[..], b"BZ"].concat()),
            DecodeError::Truncated
        ));
        assert!(matches!(err(&bz[..bz.len() - 1]), DecodeError::Truncated));
        assert!(matches!(
            err(b"BZh9\0\0\0\0\0\0\0\0\0\0\0\0"),
            DecodeError::Corrupt(_)
        ));
        // MultiBzDecoder rejects trailing garbage too.
        assert!(reference(&[&bz[..], b"junk"].concat()).is_none());
    }

    #[test]
    fn truncation_at_many_offsets_is_an_error() {
        let mut bz = compress(&text(300_000, 5), 1);
        bz.extend(compress(&text(1000, 6), 2));
        let offsets = (0..bz.len()).step_by(97).chain(bz.len() - 40..bz.len());
        for cut in offsets {
            assert!(par(&bz[..cut], 2).is_err(), "cut at {cut}");
            assert!(reference(&bz[..cut]).is_none());
        }
    }

    #[test]
    fn bit_flips_error_or_match_reference() {
        let bz = compress(&text(300_000, 8), 1);
        let mut r = Rng(9);
        for i in 0..400 {
            let mut b = bz.clone();
            let bit = if i < 100 {
                r.below(64 * 8)
            } else {
                r.below(bz.len() as u64 * 8)
            };
            b[(bit / 8) as usize] ^= 0x80 >> (bit % 8);
            check_vs_reference(&b, 1 + i % 2);
        }
    }

    #[test]
    fn random_garbage_is_rejected() {
        let mut r = Rng(10);
        let block = BLOCK_MAGIC.to_be_bytes();
        for i in 0..300 {
            let mut b: Vec<u8> = (0..r.below(5000)).map(|_| r.next() as u8).collect();
            if i % 3 > 0 {
                b.splice(
                    0..0,
                    [&b"BZh9"[..], &block[2..]]
                        .concat()
                        .into_iter()
                        .take(4 + 6 * (i % 3 - 1)),
                );
            }
            assert!(par(&b, 2).is_err());
            assert!(reference(&b).is_none());
        }
        // Dense fake block headers: many cuts to repair, must fail fast.
        let unit = [&block[2..], &[0u8; 8][..]].concat();
        let dense = [&b"BZh9"[..], &unit.repeat(100_000)].concat();
        let t = std::time::Instant::now();
        assert!(matches!(par(&dense, 2), Err(DecodeError::Corrupt(_))));
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn false_block_boundaries_are_repaired() {
        let data = text(500_000, 11);
        let bz = compress(&data, 2);
        for k in [1, 1000, 77_777] {
            let d = ParallelDecoder {
                split_at: Some(k),
                ..ParallelDecoder::new(2)
            };
            let (out, st) = run(&d, &bz).unwrap();
            assert!(out == data);
            assert_eq!(st.blocks, 3);
            let mut bad = bz.clone();
            bad[bz.len() / 2] ^= 4;
            assert!(run(&d, &bad).is_err());
        }
    }

    #[test]
    fn memory_stays_bounded() {
        let data = text(6_000_000, 12);
        let bz = compress(&data, 1);
        for (threads, max) in [(1, 2), (2, 4), (3, 5)] {
            let d = ParallelDecoder::new(threads).with_max_in_flight(max);
            let stats = d
                .decode(&bz[..], |_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok::<_, ()>(())
                })
                .unwrap();
            assert_eq!(stats.blocks, 61);
            assert!(stats.peak_pieces_in_flight <= max, "{stats:?}");
            assert!(stats.peak_read_buffer as u64 <= max_block_bytes(1) + 2 * READ_CHUNK as u64);
        }
    }

    /// Endless input repeating a whole stream; counts the bytes read.
    struct Endless(Vec<u8>, std::sync::Arc<AtomicUsize>);
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let at = self.1.load(Relaxed) % self.0.len();
            let n = buf.len().min(self.0.len() - at).min(4096);
            buf[..n].copy_from_slice(&self.0[at..at + n]);
            self.1.fetch_add(n, Relaxed);
            Ok(n)
        }
    }

    #[test]
    fn sink_error_stops_promptly_and_joins_all_threads() {
        let bz = compress(&text(400_000, 13), 1);
        for threads in [1, 2, 4] {
            let read = std::sync::Arc::new(AtomicUsize::new(0));
            let mut n = 0;
            let r = ParallelDecoder::new(threads).decode(Endless(bz.clone(), read.clone()), |_| {
                n += 1;
                if n == 10 { Err("enough") } else { Ok(()) }
            });
            assert!(matches!(r, Err(DecodeError::Stopped("enough"))));
            // The splitter thread dropped the input, so every thread has exited,
            // and it stopped reading soon after the sink failed.
            assert_eq!(std::sync::Arc::strong_count(&read), 1);
            assert!(
                read.load(Relaxed) < 10 * bz.len() + 2 * READ_CHUNK,
                "read too far"
            );
        }
    }

    #[test]
    fn sequential_matches_and_maps_errors() {
        let data = text(300_000, 14);
        let bz = [compress(&data, 1), compress(&data, 9)].concat();
        let mut out = Vec::new();
        let st = decode_sequential(&bz[..], 4096, |c| {
            assert!(c.len() <= 4096);
            out.extend(c);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(out == [&data[..], &data].concat());
        assert_eq!(st.compressed_bytes, bz.len() as u64);
        let seq = |b: &[u8]| decode_sequential(b, 1 << 16, |_| Ok::<_, ()>(())).unwrap_err();
        assert!(matches!(seq(b""), DecodeError::NotBzip2));
        assert!(matches!(seq(b"nope"), DecodeError::NotBzip2));
        assert!(matches!(seq(&bz[..bz.len() - 3]), DecodeError::Truncated));
        assert!(matches!(
            seq(&[&bz[..], b"junk"].concat()),
            DecodeError::TrailingGarbage
        ));
        let r = decode_sequential(&bz[..], 100, |_| Err(7));
        assert!(matches!(r, Err(DecodeError::Stopped(7))));
    }

    /// Decodes the file `BZ_FILE` with `BZ_THREADS` (default 1) threads, or
    /// with libbz2 alone if `BZ_LIBBZ2` is set; for profiling, e.g.
    /// `BZ_FILE=/tmp/x.bz2 valgrind --tool=callgrind target/release/deps/sandbox_bridge-* --ignored --exact feed::decode::tests::decode_file`.
    #[test]
    #[ignore = "benchmark; needs BZ_FILE"]
    fn decode_file() {
        let path = std::env::var("BZ_FILE").expect("BZ_FILE");
        let threads = std::env::var("BZ_THREADS").map_or(1, |t| t.parse().unwrap());
        let bz = std::fs::read(path).unwrap();
        let t = std::time::Instant::now();
        let mut n = 0;
        let st = if std::env::var_os("BZ_LIBBZ2").is_some() {
            decode_sequential(&bz[..], 1 << 20, |c| {
                n += c.len();
                Ok::<_, ()>(())
            })
        } else {
            ParallelDecoder::new(threads).decode(&bz[..], |c| {
                n += c.len();
                Ok::<_, ()>(())
            })
        }
        .unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{n} bytes in {s:.3} s = {:.1} MB/s; {st:?}",
            n as f64 / s / 1e6
        );
    }
}
