//! keyprotect-client (work in progress).
