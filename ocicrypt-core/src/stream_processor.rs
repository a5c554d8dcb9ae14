//! containerd stream processor (ctd-decoder compatible) logic.
