//! A criterion [`Measurement`] of the calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`).
//!
//! `openssl speed` measures user CPU time by default, so on a machine shared with other work a
//! wall-clock benchmark would be compared with a figure that other processes do not disturb.
//! Measuring the benchmark thread's CPU time puts both on the same footing.

use std::time::Duration;

use criterion::measurement::{Measurement, ValueFormatter};
use criterion::Throughput;
use rustix::time::{clock_gettime, ClockId};

/// CPU time of the benchmarking thread, in nanoseconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadCpuTime;

/// The thread's CPU time so far.
pub fn thread_cpu_time() -> Duration {
    let t = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, i: Duration) -> Duration {
        thread_cpu_time().saturating_sub(i)
    }
    fn add(&self, v1: &Duration, v2: &Duration) -> Duration {
        *v1 + *v2
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, val: &Duration) -> f64 {
        val.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, ns: f64, values: &mut [f64]) -> &'static str {
        let (factor, unit) = if ns < 1e3 {
            (1.0, "ns cpu")
        } else if ns < 1e6 {
            (1e-3, "µs cpu")
        } else if ns < 1e9 {
            (1e-6, "ms cpu")
        } else {
            (1e-9, "s cpu")
        };
        for v in values {
            *v *= factor;
        }
        unit
    }

    fn scale_throughputs(&self, _typical: f64, throughput: &Throughput, values: &mut [f64]) -> &'static str {
        // values are ns per iteration; report decimal megabytes (or elements) per CPU second.
        let per_iter = match *throughput {
            Throughput::Bytes(n) | Throughput::BytesDecimal(n) | Throughput::Elements(n) => n as f64,
        };
        for v in values.iter_mut() {
            *v = per_iter / (*v / 1e9) / 1e6;
        }
        match throughput {
            Throughput::Elements(_) => "Melem/cpu-s",
            _ => "MB/cpu-s",
        }
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_advances_with_work_and_scales() {
        let a = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = thread_cpu_time();
        assert!(b > a);
        let mut v = [2e9];
        assert_eq!(CpuFormatter.scale_values(2e9, &mut v), "s cpu");
        assert_eq!(v[0], 2.0);
        let mut t = [1e9];
        CpuFormatter.scale_throughputs(1e9, &Throughput::Bytes(1_000_000), &mut t);
        assert_eq!(t[0], 1.0);
    }
}
