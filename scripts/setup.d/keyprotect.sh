# shellcheck shell=bash
# Key Protect tests: IBM's Python SDKs (PyPI `keyprotect` + `redstone`) in a venv under
# target/py-kp, used by keyprotect-emulator/tests/python_sdk.rs to check the Key Protect emulator
# against clients we did not write. Sourced by scripts/test; safe to run again.
#
# Exports IMGCRYPT_KP_PYTHON (the venv's python).
imgcrypt_setup_keyprotect() {
  local venv="$PWD/target/py-kp"
  local py="$venv/bin/python"
  if [ ! -x "$py" ] || ! "$py" -c 'import keyprotect, redstone, ibm_cloud_sdk_core' >/dev/null 2>&1; then
    local sys_py
    sys_py="$(command -v python3 || true)"
    if [ -z "$sys_py" ]; then
      echo "keyprotect setup: python3 not found; the Python SDK test will fail under IMGCRYPT_REQUIRE_TOOLS=1" >&2
      return 0
    fi
    mkdir -p "$PWD/target"
    if ! "$sys_py" -m venv "$venv" >&2; then
      echo "keyprotect setup: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
      return 0
    fi
    echo "keyprotect setup: installing keyprotect and redstone from PyPI into $venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check 'keyprotect>=3,<4' 'redstone>=0.6,<1' >&2 ||
      echo "keyprotect setup: pip install failed" >&2
  fi
  export IMGCRYPT_KP_PYTHON="$py"
}
imgcrypt_setup_keyprotect
