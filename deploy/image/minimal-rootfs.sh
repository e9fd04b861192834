#!/bin/sh
# minimal-rootfs.sh BINARY ROOTFS - the file tree of the minimal image (Dockerfile stage
# minimal-rootfs): the stripped binary, the shared libraries `ldd` names for it (and the
# dynamic loader), the system CA bundle, passwd/group/nsswitch entries for uid/gid 10025,
# the baked configuration and the spool directory. No shell, no package manager, nothing
# else: a FilterCommand (always run with /bin/sh -c) cannot run in it.
set -eu
bin=$1 root=$2

mkdir -p "$root/usr/sbin" "$root/etc/ssl/certs" "$root/etc/proxsmtpd/filters" \
         "$root/var/spool/proxsmtpd" "$root/tmp"
install -m 0755 "$bin" "$root/usr/sbin/proxsmtpd"

# merged /usr: /lib and /lib64 are symlinks into /usr on Debian; keep them as they are so
# that the loader path in the binary (PT_INTERP) and the library paths resolve the same way
for top in /lib /lib64 /lib32 /libx32; do
  [ -L "$top" ] && cp -P "$top" "$root$top"
done
# copy_path PATH: PATH into the tree, following symlinks one level at a time, so that every
# name the loader looks up exists in the tree as it does here
copy_path() {
  p=$1
  while :; do
    dir=$(readlink -f "$(dirname "$p")")
    p="$dir/$(basename "$p")"
    mkdir -p "$root$dir"
    if [ -L "$p" ]; then
      cp -P "$p" "$root$p"
      t=$(readlink "$p")
      case "$t" in /*) p=$t ;; *) p="$dir/$t" ;; esac
    else
      cp "$p" "$root$p"
      return 0
    fi
  done
}
libs=$(ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p')
[ -n "$libs" ] || { echo "minimal-rootfs: ldd named no libraries for $bin" >&2; exit 1; }
for lib in $libs; do
  copy_path "$lib"
  echo "minimal-rootfs: $lib"
done

# the system roots (rustls-native-certs reads /etc/ssl/certs/ca-certificates.crt)
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# uid/gid 10025 by name (and root, for tools that expect it); no login shell exists
printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
  'proxsmtpd:x:10025:10025:proxsmtpd:/var/spool/proxsmtpd:/usr/sbin/nologin' > "$root/etc/passwd"
printf '%s\n' 'root:x:0:' 'proxsmtpd:x:10025:' > "$root/etc/group"
printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' > "$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
chown 10025:10025 "$root/var/spool/proxsmtpd"
chmod 0750 "$root/var/spool/proxsmtpd"
chmod 1777 "$root/tmp"
