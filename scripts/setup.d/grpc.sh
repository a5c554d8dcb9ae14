# shellcheck shell=bash
# gRPC key-provider tests: Python `grpcio` (Google's gRPC, an implementation we did not write) and
# `grpcio-tools` (compiles keyprovider.proto at test time; no system protoc) from PyPI in a venv
# under target/py-grpc, used by ocicrypt-core/tests/keyprovider_grpc.rs and
# keyprotect-client/tests/keyprovider_grpc.rs. Sourced by scripts/test; safe to run again.
#
# Exports IMGCRYPT_GRPC_PYTHON (the venv's python).
imgcrypt_setup_grpc() {
  imgcrypt_python_venv grpc py-grpc 'grpc, grpc_tools.protoc' 'grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2'
  [ -z "$IMGCRYPT_VENV_PYTHON" ] || export IMGCRYPT_GRPC_PYTHON="$IMGCRYPT_VENV_PYTHON"
}
imgcrypt_setup_grpc
