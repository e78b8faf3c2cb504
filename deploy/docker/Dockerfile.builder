# Kiln builder on a GPU host: NVIDIA's TensorRT image brings CUDA, TensorRT and its Python API.
# Build engines with:  docker run --gpus all -v $PWD/model_repository:/repo kiln-builder \
#   kiln build /models/m.onnx --name m --precision int8 --target tensorrt --calib /data/calib.npz --repo /repo
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
FROM ${TRT_IMAGE}
WORKDIR /opt/kiln
COPY pyproject.toml README.md ./
COPY core ./core
COPY runtime ./runtime
COPY builders ./builders
COPY server ./server
RUN pip install --no-cache-dir -e '.[tensorrt]'
ENTRYPOINT ["kiln"]
CMD ["doctor"]
