//! Herald has nothing to generate; this script exists for its build
//! dependency. RocksDB's build script (bindgen) uses `regex`; so does a
//! build step of `promql-parser`, a dev-dependency, with regex's default
//! features. Test builds unify the two, plain builds did not, so `cargo run`
//! and `cargo test` saw different build scripts for `librocksdb-sys` and
//! compiled RocksDB's C++ twice. Asking for regex's default features here
//! makes every build resolve the same, so the C++ compiles once.
fn main() {}
