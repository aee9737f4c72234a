//! Benchmarks of the mesh. The criterion benches are in `benches/benches/`; results and the
//! commands that produced them are in `benches/RESULTS.md`.
