#!/bin/sh
# Builds the Debian "stack" image that apps run on: a debootstrap --variant=minbase root file
# system packed as one layer tarball for flynn-container's ImageStore.
#
#   host/images/build-stack.sh OUT.tar [SUITE] [MIRROR]
#
# SUITE defaults to bookworm, MIRROR to http://deb.debian.org/debian. Downloaded .debs are kept
# in $FLYNN_IMAGE_CACHE (default /var/cache/flynn/images/debs), so rebuilding needs no network
# once the cache is warm (debootstrap only fetches the indices it cannot find). The tarball is
# deterministic for a given package set (sorted names, numeric owners, mtime clamped to the
# newest package's). Needs root and the debootstrap package; not used by CI tests, which use
# the busybox image (build-busybox.sh).
set -eu

out=${1:?usage: build-stack.sh OUT.tar [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
cache=${FLYNN_IMAGE_CACHE:-/var/cache/flynn/images/debs}

[ "$(id -u)" = 0 ] || { echo "build-stack.sh: must run as root" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build-stack.sh: apt-get install debootstrap" >&2; exit 1; }

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
root=$(mktemp -d "${TMPDIR:-/tmp}/flynn-stack.XXXXXX")
trap 'rm -rf "$root"' EXIT INT TERM

debootstrap --variant=minbase --cache-dir="$cache" \
    --include=ca-certificates,netbase,tzdata \
    "$suite" "$root" "$mirror"

# Trim what a job never needs and what differs between builds.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/var/cache/debconf/*-old \
    "$root"/tmp/* "$root"/root/.bash_history
: >"$root/etc/machine-id"
# The job's resolv.conf and hostname come from the host at run time.
: >"$root/etc/resolv.conf"
echo localhost >"$root/etc/hostname"

newest=$(find "$root/var/lib/dpkg/info" -name '*.list' -printf '%T@\n' | sort -n | tail -1 | cut -d. -f1)
tar --sort=name --numeric-owner --xattrs \
    --mtime="@${newest:-0}" --clamp-mtime \
    -C "$root" -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "stack image: $out ($(sha256sum "$out" | cut -d' ' -f1))"
