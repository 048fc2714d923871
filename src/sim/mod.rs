//! The chenyu simulator (being written).
