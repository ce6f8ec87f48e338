#!/bin/sh
# Installs the tools the benchmark compares against (Debian/Ubuntu): fio, rclone, curl, aria2.
exec "$(dirname "$0")/../contrib/install-system-deps.sh" fio rclone curl aria2c=aria2
