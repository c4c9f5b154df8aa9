//! Splitting decoded batch bytes into lines with bounded memory.
//!
//! Decoded chunks arrive in order; lines inside a chunk are handed out as
//! borrowed slices (no copy). Only a line that crosses a chunk boundary is
//! carried over, and the carry never grows past `limit` bytes: a longer line
//! is followed to its end while only its first `limit` bytes are kept, its
//! SHA-256 and length computed on the way. Memory is therefore at most one
//! chunk plus `limit`, whatever the batch or line size.

use sha2::{Digest, Sha256};

/// One line of a batch, without its `\n`.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The whole line is in memory.
    Whole { number: u64, bytes: &'a [u8] },
    /// The line was longer than the limit: only its start is kept.
    Oversize {
        number: u64,
        /// Length of the whole line in bytes.
        size: u64,
        /// SHA-256 of the whole line.
        sha256: [u8; 32],
        /// The first `limit` bytes of the line.
        prefix: &'a [u8],
    },
}

impl Line<'_> {
    pub fn number(&self) -> u64 {
        match self {
            Line::Whole { number, .. } | Line::Oversize { number, .. } => *number,
        }
    }
}

struct Overflow {
    hasher: Sha256,
    size: u64,
}

/// Turns a sequence of decoded chunks into numbered lines (1-based).
pub struct LineSplitter {
    limit: usize,
    carry: Vec<u8>,
    overflow: Option<Overflow>,
    line_number: u64,
}

impl LineSplitter {
    /// `limit`: the longest line kept whole across chunk boundaries.
    pub fn new(limit: usize) -> LineSplitter {
        LineSplitter {
            limit,
            carry: Vec::new(),
            overflow: None,
            line_number: 0,
        }
    }

    /// Bytes held back between chunks (never more than `limit`).
    pub fn carried_bytes(&self) -> usize {
        self.carry.len()
    }

    /// Feeds the next chunk, handing every line it completes to `on_line`.
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        mut on_line: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut rest = chunk;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let (part, after) = (&rest[..nl], &rest[nl + 1..]);
            self.line_number += 1;
            if self.carry.is_empty() && self.overflow.is_none() {
                on_line(Line::Whole {
                    number: self.line_number,
                    bytes: part,
                })?;
            } else {
                self.append(part);
                self.emit_carry(&mut on_line)?;
            }
            rest = after;
        }
        self.append(rest);
        Ok(())
    }

    /// Ends the batch: a last line without a trailing `\n` is handed out too.
    pub fn finish<E>(
        &mut self,
        mut on_line: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.carry.is_empty() || self.overflow.is_some() {
            self.line_number += 1;
            self.emit_carry(&mut on_line)?;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if let Some(o) = &mut self.overflow {
            o.hasher.update(bytes);
            o.size += bytes.len() as u64;
            return;
        }
        if self.carry.len() + bytes.len() <= self.limit {
            self.carry.extend_from_slice(bytes);
            return;
        }
        // The line outgrows the limit: keep its first `limit` bytes, hash the rest.
        let mut hasher = Sha256::new();
        hasher.update(&self.carry);
        hasher.update(bytes);
        let keep = self.limit - self.carry.len();
        self.carry.extend_from_slice(&bytes[..keep]);
        self.overflow = Some(Overflow {
            hasher,
            size: (self.carry.len() - keep + bytes.len()) as u64,
        });
    }

    fn emit_carry<E>(
        &mut self,
        on_line: &mut impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let number = self.line_number;
        let result = match self.overflow.take() {
            None => on_line(Line::Whole {
                number,
                bytes: &self.carry,
            }),
            Some(o) => on_line(Line::Oversize {
                number,
                size: o.size,
                sha256: o.hasher.finalize().into(),
                prefix: &self.carry,
            }),
        };
        self.carry.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects lines as (number, bytes-or-prefix, size, whole?).
    fn split(chunks: &[&[u8]], limit: usize) -> Vec<(u64, Vec<u8>, u64, bool)> {
        let mut s = LineSplitter::new(limit);
        let mut out = Vec::new();
        let mut take = |l: Line<'_>| -> Result<(), ()> {
            match l {
                Line::Whole { number, bytes } => {
                    out.push((number, bytes.to_vec(), bytes.len() as u64, true))
                }
                Line::Oversize {
                    number,
                    size,
                    sha256,
                    prefix,
                } => {
                    assert_eq!(prefix.len(), limit);
                    let _ = sha256;
                    out.push((number, prefix.to_vec(), size, false))
                }
            }
            Ok(())
        };
        for c in chunks {
            s.push(c, &mut take).unwrap();
            assert!(s.carried_bytes() <= limit);
        }
        s.finish(&mut take).unwrap();
        out
    }

    #[test]
    fn lines_inside_and_across_chunks() {
        let got = split(&[b"a\nbb", b"b\n\nccc", b"\nd"], 100);
        let want: Vec<(u64, Vec<u8>, u64, bool)> = vec![
            (1, b"a".to_vec(), 1, true),
            (2, b"bbb".to_vec(), 3, true),
            (3, b"".to_vec(), 0, true),
            (4, b"ccc".to_vec(), 3, true),
            (5, b"d".to_vec(), 1, true),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn trailing_newline_adds_no_line() {
        let got = split(&[b"x\n", b"y\n"], 10);
        assert_eq!(got.len(), 2);
        assert_eq!(split(&[b""], 10).len(), 0);
    }

    #[test]
    fn long_line_across_chunks_is_cut_hashed_and_sized() {
        let line: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut data = line.clone();
        data.extend_from_slice(b"\nshort\n");
        let chunks: Vec<&[u8]> = data.chunks(777).collect();
        let mut s = LineSplitter::new(1000);
        let mut seen = Vec::new();
        for c in &chunks {
            s.push(c, |l| -> Result<(), ()> {
                match l {
                    Line::Oversize {
                        number,
                        size,
                        sha256,
                        prefix,
                    } => {
                        assert_eq!((number, size), (1, 10_000));
                        assert_eq!(prefix, &line[..1000]);
                        assert_eq!(sha256, <[u8; 32]>::from(Sha256::digest(&line)));
                        seen.push("big");
                    }
                    Line::Whole { number, bytes } => {
                        assert_eq!((number, bytes), (2, &b"short"[..]));
                        seen.push("short");
                    }
                }
                Ok(())
            })
            .unwrap();
            assert!(s.carried_bytes() <= 1000, "carry grew past the limit");
        }
        s.finish(|_| -> Result<(), ()> { panic!("no line left") })
            .unwrap();
        assert_eq!(seen, ["big", "short"]);
    }

    #[test]
    fn line_exactly_at_the_limit_stays_whole() {
        let got = split(&[b"0123", b"456789\n"], 10);
        assert_eq!(got, vec![(1, b"0123456789".to_vec(), 10, true)]);
        let got = split(&[b"0123", b"4567890\n"], 10);
        assert_eq!(got, vec![(1, b"0123456789".to_vec(), 11, false)]);
    }

    #[test]
    fn errors_from_the_handler_stop_the_split() {
        let mut s = LineSplitter::new(10);
        let mut n = 0;
        let r = s.push(b"a\nb\nc\n", |_| {
            n += 1;
            if n == 2 { Err("stop") } else { Ok(()) }
        });
        assert_eq!(r, Err("stop"));
        assert_eq!(n, 2);
    }
}
