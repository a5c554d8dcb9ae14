# shellcheck shell=bash
# Key Protect tests: IBM's Python SDKs (PyPI `keyprotect` + `redstone`) in a venv under
# target/py-kp, used by keyprotect-emulator/tests/python_sdk.rs to check the Key Protect emulator
# against clients we did not write. Sourced by scripts/test; safe to run again.
#
# Exports IMGCRYPT_KP_PYTHON (the venv's python).
imgcrypt_setup_keyprotect() {
  imgcrypt_python_venv keyprotect py-kp 'keyprotect, redstone, ibm_cloud_sdk_core' 'keyprotect>=3,<4' 'redstone>=0.6,<1'
  [ -z "$IMGCRYPT_VENV_PYTHON" ] || export IMGCRYPT_KP_PYTHON="$IMGCRYPT_VENV_PYTHON"
}
imgcrypt_setup_keyprotect
