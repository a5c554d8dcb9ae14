//! Criterion benchmarks of the layer cipher.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ocicrypt_core::cipher::{LayerDecryptor, LayerEncryptor, LayerKey, Nonce};

fn cipher(c: &mut Criterion) {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let total = 16 << 20;
    let mut g = c.benchmark_group("layer-cipher");
    g.throughput(Throughput::Bytes(total as u64));
    for chunk in [4 << 10, 64 << 10, 1 << 20] {
        let mut buf = vec![0x5au8; total];
        g.bench_with_input(BenchmarkId::new("encrypt", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut e = LayerEncryptor::new(&key, &nonce);
                for c in buf.chunks_mut(chunk) {
                    e.update(c);
                }
                e.finish()
            })
        });
        let mac = {
            let mut e = LayerEncryptor::new(&key, &nonce);
            e.update(&mut buf);
            e.finish()
        };
        g.bench_with_input(BenchmarkId::new("decrypt", chunk), &chunk, |b, &chunk| {
            b.iter(|| {
                let mut d = LayerDecryptor::new(&key, &nonce, mac.as_bytes()).unwrap();
                for c in buf.chunks_mut(chunk) {
                    d.update(c);
                }
                // The buffer is decrypted in place each iteration; verification result is irrelevant.
                let _ = d.verify();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, cipher);
criterion_main!(benches);
