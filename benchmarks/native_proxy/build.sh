#!/bin/sh
# Builds the native proxy prototype (needs Debian's libgrpc++-dev: apt-get install libgrpc++-dev).
set -e
cd "$(dirname "$0")"
mkdir -p build
g++ -O2 -std=c++17 -o build/kiln_native_proxy proxy.cc $(pkg-config --cflags --libs grpc++ protobuf)
