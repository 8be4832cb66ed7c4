FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md gunicorn.conf.py ./
COPY metrics ./metrics
COPY loadtest ./loadtest
COPY webapp ./webapp
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home promfork
USER 10001
EXPOSE 8000 9100
CMD ["gunicorn", "-c", "gunicorn.conf.py", "--bind", "0.0.0.0:8000", "--no-control-socket"]
