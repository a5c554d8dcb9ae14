//! The imgcrypt command line (work in progress).
