#!/bin/sh
# Installs the tools the benchmark compares against (Debian/Ubuntu): fio, rclone, curl.
exec "$(dirname "$0")/../contrib/install-system-deps.sh" fio rclone curl
