//! Client side of the ocicrypt key-provider protocol (`provider:<name>` recipients).
