//! Benchmarks of imgcrypt: criterion benches of the layer cipher in `benches/`, scripts comparing
//! the `imgcrypt` CLI with skopeo (`vs-skopeo.sh`) and the node agent (`agent-bench.sh`, and N of them as a cluster: `cluster-bench.sh`), and
//! the helper binaries those scripts use.

pub mod agent;
pub mod cluster;
pub mod cputime;
pub mod mkimage;
