# Reference only: holdfast builds this image itself (`holdfast image echo`, or on demand
# when a task asks for holdfast/echo:*) from an in-memory context, because edge hosts
# often have no registry. By hand, with the output of packaging/build-static.sh copied
# next to this file as `holdfast`:
#   docker build -f echo.Dockerfile -t holdfast/echo:latest .
FROM scratch
COPY holdfast /holdfast
ENTRYPOINT ["/holdfast"]
CMD ["echo", "--listen", "0.0.0.0:7777"]
