//! A cluster in one machine: N `keysync-agent` processes against one Kubernetes API stand-in and
//! one Key Protect emulator (see `imgcrypt_benches::cluster`).
//!
//! ```text
//! cluster-bench --agent target/release/keysync-agent [--nodes 40] [--keys 200] [--kp-keys 10]
//! ```
//! Prints the figures as a table on stderr and as one JSON object on stdout; exits 1 when a check
//! fails (unwraps per node per ciphertext not exactly one, a node that does not converge).
fn main() -> std::process::ExitCode {
    match imgcrypt_benches::cluster::main_with_args(std::env::args().skip(1).collect()) {
        Ok(r) => {
            eprintln!("{}", imgcrypt_benches::cluster::table(&r));
            println!("{}", serde_json::to_string(&r).expect("json"));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cluster-bench: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
