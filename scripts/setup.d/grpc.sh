# shellcheck shell=bash
# gRPC key-provider tests: Python `grpcio` (Google's gRPC, an implementation we did not write) and
# `grpcio-tools` (compiles keyprovider.proto at test time; no system protoc) from PyPI in a venv
# under target/py-grpc, used by ocicrypt-core/tests/keyprovider_grpc.rs and
# keyprotect-client/tests/keyprovider_grpc.rs. Sourced by scripts/test; safe to run again.
#
# Exports IMGCRYPT_GRPC_PYTHON (the venv's python).
imgcrypt_setup_grpc() {
  local venv="$PWD/target/py-grpc"
  local py="$venv/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c 'import grpc, grpc_tools.protoc' >/dev/null 2>&1; then
    local sys_py
    sys_py="$(command -v python3 || true)"
    if [ -z "$sys_py" ]; then
      echo "grpc setup: python3 not found; the grpcio tests will fail under IMGCRYPT_REQUIRE_TOOLS=1" >&2
      return 0
    fi
    mkdir -p "$PWD/target"
    if ! "$sys_py" -m venv "$venv" >&2; then
      echo "grpc setup: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
      return 0
    fi
    echo "grpc setup: installing grpcio and grpcio-tools from PyPI into $venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check 'grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2' >&2 ||
      echo "grpc setup: pip install failed" >&2
  fi
  export IMGCRYPT_GRPC_PYTHON="$py"
}
imgcrypt_setup_grpc
