#!/usr/bin/env sh
# Builds ssdkd's wheel: one abi3 wheel (CPython >= 3.9) for Linux x86_64 that installs
# with `pip install --no-deps ssdkd-*.whl` on a machine without Rust or network.
#
#   python/build_wheel.sh [OUT_DIR]          maturin build --release (manylinux tag of
#                                            this machine's glibc)
#   ZIG=1 python/build_wheel.sh [OUT_DIR]    links with zig for the manylinux2014 tag
#                                            (glibc >= 2.17); needs `pip install ziglang`
#
# Needs maturin (`pip install maturin`) and a Rust toolchain on the building machine only.
# CARGO_TARGET_DIR is honoured (the build is cached there).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/dist"}
if [ "${ZIG:-0}" = "1" ]; then
    maturin build --release -m "$here/Cargo.toml" --zig --compatibility manylinux2014 -o "$out"
else
    maturin build --release -m "$here/Cargo.toml" -o "$out"
fi
ls -l "$out"/ssdkd-*.whl
