//! Test support shared by the workspace's integration tests: real components started on
//! loopback (Debian's docker-registry, the Kubernetes API stand-in), external tools (skopeo,
//! openssl, SoftHSM2 and pkcs11-tool), and an independent OCI layout builder.
#![allow(missing_docs)]

pub mod containerd;
pub mod grpc;
pub mod image;
pub mod kube;
pub mod registry;
pub mod softhsm;
pub mod tools;
