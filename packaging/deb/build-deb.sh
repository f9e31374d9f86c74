#!/bin/sh
# Builds slotline_<version>_<arch>.deb: the project and its Python dependencies installed into
# /opt/slotline/lib (pip --target, so the tree is relocatable and needs no venv), a /usr/bin/slotline
# wrapper, the systemd units and the sample configs. Depends only on the distribution's python3.
# Usage: packaging/deb/build-deb.sh OUT_DIR   (run from the project root)
set -eu
out=${1:?usage: build-deb.sh OUT_DIR}
root=$(pwd)
py=${PYTHON:-python3}
version=$($py -c "import tomllib;print(tomllib.load(open('pyproject.toml','rb'))['project']['version'])")
arch=$(dpkg --print-architecture)
pyver=$($py -c 'import sys;print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage/DEBIAN" "$stage/opt/slotline/lib" "$stage/usr/bin" \
  "$stage/lib/systemd/system" "$stage/etc/slotline" "$stage/usr/share/doc/slotline"
$py -m pip install --quiet --no-compile --target "$stage/opt/slotline/lib" "$root"
cat > "$stage/usr/bin/slotline" <<WRAP
#!/bin/sh
# Slotline's libraries live beside the system Python, not in it (no clash with Debian packages).
PYTHONPATH=/opt/slotline/lib\${PYTHONPATH:+:\$PYTHONPATH} exec python3 -c 'import slotline_cli; slotline_cli.main()' "\$@"
WRAP
chmod 0755 "$stage/usr/bin/slotline"
cp packaging/systemd/*.service "$stage/lib/systemd/system/"
for f in packaging/agent/agent.toml packaging/controller/controller.toml; do
  [ -f "$f" ] && cp "$f" "$stage/etc/slotline/"
done
cp README.md "$stage/usr/share/doc/slotline/"
size=$(du -sk "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CTRL
Package: slotline
Version: $version
Architecture: $arch
Maintainer: Slotline team <team@slotline.invalid>
Depends: python3 (>= $pyver)
Recommends: mosquitto, libubootenv-tool
Installed-Size: $size
Section: admin
Priority: optional
Description: fleet rollouts for edge devices
 Signed delta bundles over MQTT, A/B slots with trial boot and automatic
 revert, staged rollouts gated on health. One 'slotline' command: agent,
 controller, relay, bundle tools and the fleet simulator.
CTRL
cat > "$stage/DEBIAN/conffiles" <<EOF2
$(cd "$stage" && find etc -type f | sed 's|^|/|')
EOF2
[ -s "$stage/DEBIAN/conffiles" ] || rm "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POST'
#!/bin/sh
set -e
# Units are installed but not enabled: a device runs the agent, a server the controller.
if [ "$1" = configure ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
POST
chmod 0755 "$stage/DEBIAN/postinst"
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/slotline_${version}_${arch}.deb" >/dev/null
echo "$out/slotline_${version}_${arch}.deb"
