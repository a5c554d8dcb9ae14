//! Benchmarks `keysync-agent` against the Kubernetes API stand-in and the Key Protect emulator.
//!
//! ```text
//! agent-bench --agent target/release/keysync-agent [--secrets 1000] [--latency-samples 200]
//!             [--kp-distinct 50] [--kp-copies 2]
//! ```
//! Prints the figures as a table on stderr and as one JSON object on stdout.
fn main() -> std::process::ExitCode {
    match imgcrypt_benches::agent::main_with_args(std::env::args().skip(1).collect()) {
        Ok(r) => {
            eprintln!("{}", imgcrypt_benches::agent::table(&r));
            println!("{}", serde_json::to_string(&r).expect("json"));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent-bench: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
