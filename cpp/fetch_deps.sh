#!/bin/sh
# Headers the C++ runtime compiles against, unpacked under build/deps/ (gitignored), never installed:
#   - ONNX Runtime's C/C++ API headers from Debian 13's libonnxruntime-dev (no Debian 12 package ships them;
#     only the headers are used: the library run against is the onnxruntime wheel's, loaded with dlopen);
#   - nlohmann-json (header-only), unless the system has it.
# The packages come from the Debian archive this machine's own apt sources name, through a private apt
# configuration (own sources list naming the trixie suite, own lists, cache and empty dpkg status): the
# system's apt state is untouched and no host name is written in the repository. Cached: a second run
# with both present does nothing.
set -eu
OUT=${1:-build/deps}
case "$OUT" in /*) ;; *) OUT="$(pwd)/$OUT" ;; esac
INCLUDE="$OUT/usr/include"
have() { [ -f "$INCLUDE/$1" ] || [ -f "/usr/include/$1" ]; }  # a system package (Debian 13's -dev) serves too
have onnxruntime/onnxruntime_cxx_api.h && have nlohmann/json.hpp && exit 0

# The archive: the first Debian URI of /etc/apt (deb822 `URIs:` or one-line `deb URI suite`), not -security.
archive=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' \
          | grep -v security | grep '/debian/*$' | head -n 1 || true)
if [ -z "$archive" ]; then
  archive=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
            | grep -v security | grep '/debian/*$' | head -n 1 || true)
fi
[ -n "$archive" ] || { echo "fetch_deps: no Debian archive in /etc/apt sources" >&2; exit 1; }

APT="$OUT/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/etc/sources.list.d" "$APT/debs"
: > "$APT/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || keyring=/usr/share/keyrings/debian-archive-keyring.pgp  # Debian 13 ships both spellings
echo "deb [signed-by=$keyring] $archive trixie main" > "$APT/etc/sources.list"
set -- -o Dir::State::Lists="$APT/lists" -o Dir::State::status="$APT/status" -o Dir::Cache="$APT/cache" \
       -o Dir::Etc::SourceList="$APT/etc/sources.list" -o Dir::Etc::SourceParts="$APT/etc/sources.list.d" \
       -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null \
       -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1
apt-get "$@" -qq update
packages=""
have onnxruntime/onnxruntime_cxx_api.h || packages=libonnxruntime-dev
have nlohmann/json.hpp || packages="$packages nlohmann-json3-dev"
(cd "$APT/debs" && apt-get "$@" -qq download $packages)
for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$OUT"; done
# System headers are used in place (CMake looks in build/deps, then /usr/include).
have onnxruntime/onnxruntime_cxx_api.h || { echo "fetch_deps: no ONNX Runtime headers in $OUT" >&2; exit 1; }
echo "fetch_deps: headers in $INCLUDE" >&2
