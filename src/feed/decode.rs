//! Placeholder until the parallel decoder lands: same API, sequential.

use std::io::Read;

#[derive(Debug, Default)]
pub struct DecodeStats {
    pub compressed_bytes: u64,
    pub decoded_bytes: u64,
    pub streams: u32,
    pub blocks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError<E> {
    #[error("{0}")]
    Io(std::io::Error),
    #[error("stopped")]
    Stopped(E),
}

pub struct ParallelDecoder;

impl ParallelDecoder {
    pub fn new(_threads: usize) -> Self {
        ParallelDecoder
    }

    pub fn decode<R: Read + Send, E>(
        &self,
        input: R,
        mut sink: impl FnMut(Vec<u8>) -> Result<(), E>,
    ) -> Result<DecodeStats, DecodeError<E>> {
        let mut d = bzip2::read::MultiBzDecoder::new(input);
        let mut stats = DecodeStats::default();
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = d.read(&mut buf).map_err(DecodeError::Io)?;
            if n == 0 {
                return Ok(stats);
            }
            buf.truncate(n);
            stats.decoded_bytes += n as u64;
            sink(buf).map_err(DecodeError::Stopped)?;
        }
    }
}
