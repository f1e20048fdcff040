FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -m services.protos
ENV GATEWAY_MODEL_SERVER=tfserving:8500 GATEWAY_REDIS_URL=redis://redis:6379/0 GATEWAY_HOST=0.0.0.0
EXPOSE 8080
CMD ["python", "-m", "services.gateway"]
