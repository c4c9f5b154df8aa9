//! The rescan consumer: rescan requests from Kafka to the KTIP sandbox, one
//! result for every request back on Kafka.

pub mod api;
pub mod consumer;
pub mod executor;
pub mod gate;
pub mod intake;
pub mod ledger;
pub mod outcomes;
pub mod request;
pub mod result;
pub mod worker;
