# Reference only: the multi-host fault tests (tests/multihost.rs) build this image
# themselves, from a temp dir holding the static test binary, tagged
# holdfast/node:test-<hash of the binary>. A node is the binary and nothing else: no
# shell, no libc files, no NSS, so nodes address each other by IP, not by name.
# By hand, with the output of packaging/build-static.sh copied next to this file as
# `holdfast`:
#   docker build -f node.Dockerfile -t holdfast/node:dev .
#   docker run -d --network NET --ip 10.x.y.11 -p 127.0.0.1::7700 holdfast/node:dev \
#     agent --manager --node-id m1 --data-dir /data --api 0.0.0.0:7700 \
#     --cluster 0.0.0.0:7701 --advertise 10.x.y.11 --bootstrap
FROM scratch
COPY holdfast /holdfast
ENTRYPOINT ["/holdfast"]
