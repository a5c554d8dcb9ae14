# shellcheck shell=bash
# The containerd end-to-end test (imgcrypt-cli/tests/e2e_containerd.rs) runs workspace binaries of
# other packages (keysync-agent, kp-emulator), which `cargo test` only builds for their own
# integration tests: build every binary first. Sourced by scripts/test.
echo "building workspace binaries for the runtime end-to-end test" >&2
cargo build --workspace --bins --quiet
