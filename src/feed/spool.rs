//! Where a downloaded batch waits until it is published.
//!
//! A batch is downloaded completely before its Kafka transaction opens, so a
//! slow download never holds a transaction open. Small files stay in memory;
//! once a download passes `memory_limit` bytes it moves to an anonymous
//! temporary file (already unlinked, so a crash leaves nothing behind). A
//! spool can be read any number of times: a failed publish is retried from
//! it without downloading again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

/// A complete downloaded file.
#[derive(Clone)]
pub enum Spool {
    Memory(Arc<Vec<u8>>),
    File { file: Arc<File>, len: u64 },
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spool::Memory(b) => write!(f, "Spool::Memory({} bytes)", b.len()),
            Spool::File { len, .. } => write!(f, "Spool::File({len} bytes)"),
        }
    }
}

impl Spool {
    pub fn len(&self) -> u64 {
        match self {
            Spool::Memory(b) => b.len() as u64,
            Spool::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_on_disk(&self) -> bool {
        matches!(self, Spool::File { .. })
    }

    /// A fresh reader from the first byte.
    pub fn reader(&self) -> SpoolReader {
        SpoolReader {
            spool: self.clone(),
            pos: 0,
        }
    }
}

/// Reads a spool from the start; independent of other readers.
pub struct SpoolReader {
    spool: Spool,
    pos: u64,
}

impl Read for SpoolReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match &self.spool {
            Spool::Memory(b) => {
                let start = (self.pos as usize).min(b.len());
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
                n
            }
            Spool::File { file, len } => {
                let left = len.saturating_sub(self.pos);
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                file.read_at(&mut buf[..want], self.pos)?
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// Builds a spool as download chunks arrive.
pub struct SpoolWriter {
    memory_limit: usize,
    dir: Option<PathBuf>,
    memory: Vec<u8>,
    file: Option<(File, u64)>,
}

impl SpoolWriter {
    pub fn new(memory_limit: usize, dir: Option<PathBuf>) -> SpoolWriter {
        SpoolWriter {
            memory_limit,
            dir,
            memory: Vec::new(),
            file: None,
        }
    }

    /// Appends a chunk, moving to disk once the memory limit is passed.
    pub fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        if let Some((file, len)) = &mut self.file {
            file.write_all(chunk)?;
            *len += chunk.len() as u64;
            return Ok(());
        }
        if self.memory.len() + chunk.len() <= self.memory_limit {
            self.memory.extend_from_slice(chunk);
            return Ok(());
        }
        let mut file = match &self.dir {
            Some(d) => tempfile::tempfile_in(d)?,
            None => tempfile::tempfile()?,
        };
        file.write_all(&self.memory)?;
        file.write_all(chunk)?;
        let len = (self.memory.len() + chunk.len()) as u64;
        self.memory = Vec::new();
        self.file = Some((file, len));
        Ok(())
    }

    pub fn len(&self) -> u64 {
        match &self.file {
            Some((_, len)) => *len,
            None => self.memory.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn finish(self) -> io::Result<Spool> {
        Ok(match self.file {
            Some((file, len)) => Spool::File {
                file: Arc::new(file),
                len,
            },
            None => Spool::Memory(Arc::new(self.memory)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(limit: usize, chunks: &[&[u8]]) -> Spool {
        let mut w = SpoolWriter::new(limit, None);
        for c in chunks {
            w.write(c).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(s: &Spool) -> Vec<u8> {
        let mut out = Vec::new();
        s.reader().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn small_downloads_stay_in_memory() {
        let s = fill(10, &[b"abc", b"defg"]);
        assert!(!s.is_on_disk());
        assert_eq!(read_all(&s), b"abcdefg");
    }

    #[test]
    fn downloads_over_the_limit_go_to_disk_and_read_back_repeatedly() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let chunks: Vec<&[u8]> = data.chunks(4096).collect();
        let s = fill(10_000, &chunks);
        assert!(s.is_on_disk(), "memory cap not enforced");
        assert_eq!(s.len(), data.len() as u64);
        assert_eq!(read_all(&s), data);
        assert_eq!(
            read_all(&s),
            data,
            "a second read starts from the beginning"
        );
    }

    #[test]
    fn limit_zero_always_spools_to_disk() {
        let s = fill(0, &[b"x"]);
        assert!(s.is_on_disk());
        assert_eq!(read_all(&s), b"x");
    }
}
