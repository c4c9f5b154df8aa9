//! Rescan requests: parsing and validation (being written).
