#!/bin/sh
# Installs the Debian tools the test suite drives for real (broker, bootloader env tools, link
# shaping). Does nothing when they are all present; needs root (or sudo) when one is missing.
set -eu
need=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$need mosquitto"
command -v mosquitto_sub >/dev/null 2>&1 || need="$need mosquitto-clients"
command -v fw_setenv >/dev/null 2>&1 || need="$need libubootenv-tool"
command -v grub-editenv >/dev/null 2>&1 || need="$need grub-common"
command -v mke2fs >/dev/null 2>&1 || [ -x /usr/sbin/mke2fs ] || need="$need e2fsprogs"
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need="$need iproute2"
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need="$need iptables"
command -v zstd >/dev/null 2>&1 || need="$need zstd"
# real U-Boot under QEMU for tests/agent/test_uboot_qemu.py (about 90 MB installed without
# recommends)
command -v qemu-system-arm >/dev/null 2>&1 || need="$need qemu-system-arm"
[ -f /usr/lib/u-boot/qemu_arm/u-boot.bin ] || need="$need u-boot-qemu"
[ -z "$need" ] && exit 0
echo "installing system packages:$need"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# mosquitto's package starts a system service on 1883; tests use their own ports as well.
$sudo apt-get install -y -qq --no-install-recommends $need >/dev/null
