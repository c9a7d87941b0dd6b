"""A Hugging Face model folder: config.json, one or several safetensors shards, tokenizer.json.

With several shards, model.safetensors.index.json maps every tensor name to its file:
    {"metadata": {"total_size": 1234},
     "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors", ...}}
Every shard is opened (header parsed, file mapped) up front, so a broken folder fails here, not
halfway through loading the model.
"""
import json
import os

from weights.safetensors import CheckpointError, SafetensorsFile

INDEX = "model.safetensors.index.json"


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


class Checkpoint:
    def __init__(self, folder):
        self.folder = str(folder)
        self.config = read_json(os.path.join(self.folder, "config.json"))
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.folder}/config.json: a JSON {type(self.config).__name__}, "
                                  f"not an object")
        index_path = os.path.join(self.folder, INDEX)
        self._shards = {}  # file name -> SafetensorsFile, filled by one of the two readers
        if os.path.exists(index_path):
            weight_map = self._read_index(index_path)
        else:
            weight_map = self._scan_folder()
        self._where = {name: self._shards[file] for name, file in weight_map.items()}
        self.files = sorted(shard.path for shard in self._shards.values())
        self.nbytes = sum(shard.nbytes(name) for name, shard in self._where.items())

    def _read_index(self, index_path):
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        for name, file in sorted(weight_map.items()):
            # Shards live in this folder: a plain file name, never a path that could lead elsewhere.
            # (Symbolic links are allowed: the Hugging Face cache stores every file as one.)
            if not isinstance(file, str) or file in ("", ".", "..") or os.path.basename(file) != file:
                raise CheckpointError(f"{index_path}: tensor '{name}' maps to file {file!r}, "
                                      f"which is not a plain file name inside {self.folder}")
            if file not in self._shards:
                path = os.path.join(self.folder, file)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index_path}: tensor '{name}' maps to shard '{file}', "
                                          f"which does not exist")
                self._shards[file] = SafetensorsFile(path)
            if name not in self._shards[file]:
                raise CheckpointError(f"{index_path}: tensor '{name}' is not in its shard '{file}'")
        return weight_map

    def _scan_folder(self):
        files = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files and no {INDEX}")
        self._shards.update({file: SafetensorsFile(os.path.join(self.folder, file)) for file in files})
        weight_map = {}
        for file, shard in self._shards.items():
            for name in shard.names():
                if name in weight_map:
                    raise CheckpointError(f"{self.folder}: tensor '{name}' is in both '{weight_map[name]}' "
                                          f"and '{file}'")
                weight_map[name] = file
        return weight_map

    def _shard(self, name):
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: no tensor '{name}' in the checkpoint")
        return self._where[name]

    def names(self):
        return sorted(self._where)

    def info(self, name):
        """(dtype tag, shape), e.g. ("BF16", (129280, 7168))."""
        return self._shard(name).info(name)

    def nbytes_of(self, name):
        """Bytes tensor `name` takes in its shard."""
        return self._shard(name).nbytes(name)

    def get(self, name):
        """A read-only view on the mapped shard (BF16 as ml_dtypes.bfloat16, F8_E4M3 as uint8 bits)."""
        return self._shard(name).get(name)

    def __contains__(self, name):
        return name in self._where

    @property
    def tokenizer_path(self):
        return os.path.join(self.folder, "tokenizer.json")
