//! The rescan consumer: rescan requests from Kafka to the KTIP sandbox, one
//! result for every request back on Kafka.

pub mod request;
pub mod result;
