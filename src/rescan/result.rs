//! Rescan results (being written).
