//! The JWE key-wrap scheme. (Filled in by the keys work.)
