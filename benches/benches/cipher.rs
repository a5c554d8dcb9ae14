//! Criterion benchmarks of the layer cipher (AES-256-CTR + HMAC-SHA256, in place, one thread),
//! encrypt and decrypt, over a 16 MiB layer fed in chunks of several sizes.
//!
//! Two groups: `layer-cipher` measures wall-clock time; `layer-cipher-cpu` measures the thread's
//! CPU time, as `openssl speed` does, so the ratio to OpenSSL's SHA-256 stays meaningful on a
//! busy machine. `benches/cipher-vs-openssl.sh` prints that ratio.
//!
//! A third group, `layer-cipher-2threads`, measures `ocicrypt_core::cipher::parallel` (CTR on one
//! thread, HMAC on another, reading from memory and writing to a sink) in wall-clock time: its
//! point is to use two cores, so CPU time is not the measure of it.
use criterion::measurement::Measurement;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use imgcrypt_benches::cputime::ThreadCpuTime;
use ocicrypt_core::cipher::{parallel, ExpectedMac, LayerDecryptor, LayerEncryptor, LayerKey, Nonce};

/// Layer size per iteration.
const TOTAL: usize = 16 << 20;
/// Chunk sizes: 4 KiB (small reads), 64 KiB, 256 KiB, 512 KiB (the image pipeline's), 1 MiB.
const CHUNKS: [usize; 5] = [4 << 10, 64 << 10, 256 << 10, 512 << 10, 1 << 20];

fn run<M: Measurement>(g: &mut BenchmarkGroup<'_, M>) {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    g.throughput(Throughput::Bytes(TOTAL as u64));
    for chunk in CHUNKS {
        let mut buf = vec![0x5au8; TOTAL];
        g.bench_with_input(BenchmarkId::new("encrypt", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut e = LayerEncryptor::new(&key, &nonce);
                for c in buf.chunks_mut(chunk) {
                    e.update(c);
                }
                e.finish()
            })
        });
        // CTR is its own inverse, so decrypting in place turns the buffer back and forth between
        // ciphertext and plaintext: the work is the same every time, and the MAC verifies on the
        // first iteration (asserted), when the buffer holds the ciphertext it was computed over.
        let mac = {
            let mut e = LayerEncryptor::new(&key, &nonce);
            e.update(&mut buf);
            e.finish()
        };
        let mut first = true;
        g.bench_with_input(BenchmarkId::new("decrypt", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut d = LayerDecryptor::new(&key, &nonce, mac.as_bytes()).expect("mac length");
                for c in buf.chunks_mut(chunk) {
                    d.update(c);
                }
                let ok = d.verify().is_ok();
                if first {
                    assert!(ok, "the first decryption verifies");
                    first = false;
                }
                ok
            })
        });
    }
}

fn two_threads(c: &mut Criterion) {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let plain = vec![0x5au8; TOTAL];
    let mut g = c.benchmark_group("layer-cipher-2threads");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    let id = parallel::CHUNK;
    g.bench_with_input(BenchmarkId::new("encrypt", id), &id, |b, _| {
        b.iter(|| parallel::encrypt(&plain[..], std::io::sink(), &key, &nonce).expect("encrypt"))
    });
    let (ct, _, mac) = parallel::encrypt(&plain[..], Vec::new(), &key, &nonce).expect("encrypt");
    let expected = ExpectedMac::from_slice(mac.as_bytes()).expect("32-byte tag");
    g.bench_with_input(BenchmarkId::new("decrypt", id), &id, |b, _| {
        b.iter(|| parallel::decrypt(&ct[..], std::io::sink(), &key, &nonce, &expected).expect("verifies"))
    });
    g.finish();
}

fn wall(c: &mut Criterion) {
    let mut g = c.benchmark_group("layer-cipher");
    run(&mut g);
    g.finish();
}

fn cpu(c: &mut Criterion<ThreadCpuTime>) {
    let mut g = c.benchmark_group("layer-cipher-cpu");
    run(&mut g);
    g.finish();
}

criterion_group!(wall_time, wall, two_threads);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu
}
criterion_main!(wall_time, cpu_time);
