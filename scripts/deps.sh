# shellcheck shell=bash
# Installs the Debian packages the build and the tests need, when missing. Sourced by scripts/test
# and .ci/run; safe to run again (it only installs what is not there).
#
# Add packages here; per-component Python packages and services go in scripts/setup.d/.
IMGCRYPT_DEBIAN_PACKAGES=(
  # build: openssl-sys (josekit, key parsing)
  pkg-config libssl-dev
  # interop and registry tests
  skopeo docker-registry openssl
  # a Go-written image (manifest digest round trip)
  buildah
  # independent JWE check (python cryptography) and PGP keyring detection tests
  python3 python3-venv python3-pip python3-cryptography gpg
  # pgp scheme interop: gpg-agent and gpgconf for key generation in the tests
  gnupg
  # pkcs11 scheme: a token (SoftHSM2) and an independent PKCS#11 client (OpenSC's pkcs11-tool)
  softhsm2 opensc
  # benchmarks: /usr/bin/time for peak RSS
  time
  # runtime end to end (containerd stream processor)
  containerd runc busybox-static
  # layers
  zstd gzip tar
  # scripts/agent-image: strip, the CA bundle
  binutils ca-certificates
  # deploy/monitoring checks (promtool)
  prometheus
)

imgcrypt_install_deps() {
  local missing=()
  local p
  for p in "${IMGCRYPT_DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  # kubectl (for `kubectl kustomize` of deploy/): whatever kubectl is on PATH, else Debian's.
  if ! command -v kubectl >/dev/null; then
    echo "installing Debian package: kubernetes-client (kubectl)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends kubernetes-client >&2
  fi
}

# A Python venv under target/ with PyPI packages, for tests that run a peer written in Python.
#   imgcrypt_python_venv LABEL DIR IMPORTS PACKAGE...
# Creates target/DIR when IMPORTS (a Python import statement's names) do not import there, installs
# the PACKAGEs, and sets IMGCRYPT_VENV_PYTHON to the venv's python ("" when python3 or venv is
# missing: the tests that need it then fail under IMGCRYPT_REQUIRE_TOOLS=1).
imgcrypt_python_venv() {
  local label="$1" venv="$PWD/target/$2" imports="$3"
  shift 3
  local py="$venv/bin/python"
  IMGCRYPT_VENV_PYTHON=""
  if [ ! -x "$py" ] || ! "$py" -c "import $imports" >/dev/null 2>&1; then
    local sys_py
    sys_py="$(command -v python3 || true)"
    if [ -z "$sys_py" ]; then
      echo "$label setup: python3 not found; its tests will fail under IMGCRYPT_REQUIRE_TOOLS=1" >&2
      return 0
    fi
    mkdir -p "$PWD/target"
    if ! "$sys_py" -m venv "$venv" >&2; then
      echo "$label setup: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
      return 0
    fi
    echo "$label setup: installing $* from PyPI into $venv" >&2
    "$py" -m pip install --quiet --disable-pip-version-check "$@" >&2 ||
      echo "$label setup: pip install failed" >&2
  fi
  IMGCRYPT_VENV_PYTHON="$py"
}
