//! Rough figures for the client against the local emulator (loopback, plain HTTP): sequential
//! and concurrent unwraps per second, connections opened, token fetches.
//!
//! ```text
//! cargo run --release -p keyprotect-client --example kp_throughput [N]
//! ```
use std::time::Instant;

use keyprotect_client::Client;
use keyprotect_emulator::{Emulator, Op};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let emu = Emulator::start()?;
    let kp = Client::new(emu.config())?;
    let root = emu.create_root_key("bench");
    let ct = kp.wrap(&root, &[7u8; 1700], None).await?.ciphertext;

    let t = Instant::now();
    for _ in 0..n {
        kp.unwrap(&root, &ct, None).await?;
    }
    let seq = t.elapsed();
    println!(
        "sequential: {n} unwraps in {:.2} s = {:.0}/s, {:.0} us each; connections so far {}",
        seq.as_secs_f64(),
        n as f64 / seq.as_secs_f64(),
        seq.as_micros() as f64 / n as f64,
        emu.connections()
    );

    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (kp, root, ct) = (kp.clone(), root.clone(), ct.clone());
        set.spawn(async move {
            for _ in (w..n).step_by(8) {
                kp.unwrap(&root, &ct, None).await.map(drop)?;
            }
            Ok::<_, keyprotect_client::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let conc = t.elapsed();
    println!(
        "8 concurrent: {n} unwraps in {:.2} s = {:.0}/s; connections total {}, token fetches {}",
        conc.as_secs_f64(),
        n as f64 / conc.as_secs_f64(),
        emu.connections(),
        emu.count(Op::Token)
    );
    Ok(())
}
