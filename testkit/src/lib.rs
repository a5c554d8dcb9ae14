//! Test support shared by the workspace's integration tests: real components started on
//! loopback (Debian's docker-registry, the Kubernetes API stand-in), external tools (skopeo,
//! openssl), and an independent OCI layout builder.
#![allow(missing_docs)]

pub mod containerd;
pub mod image;
pub mod kube;
pub mod registry;
pub mod tools;
