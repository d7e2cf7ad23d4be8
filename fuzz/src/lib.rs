//! The fuzz targets, one function per target: each takes the fuzzer's bytes
//! and panics when a parser panics or breaks one of its properties.
pub mod targets;
