# The killswitch image: one image, two roles (service and detector), chosen by command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY detectors ./detectors
RUN pip install --no-cache-dir . && useradd --system --uid 10001 killswitch \
    && mkdir -p /data && chown killswitch /data
USER killswitch
ENV KS_DATA_DIR=/data
EXPOSE 8080
CMD ["killswitch", "serve", "--host", "0.0.0.0"]
