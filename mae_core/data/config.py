"""What the trainer reads: the data section of a TrainConfig."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

SYNTHETIC_SAMPLES = 1024
# Area range of the random crops: pre-training's (the paper's 0.2-1), and the linear probe's and
# fine-tune's (torchvision's default 0.08-1, which the official code keeps).
SCALE = (0.2, 1.0)
EVAL_CROP_SCALE = (0.08, 1.0)
# ImageNet's per-channel mean and std, which images are standardised with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class RandAugmentConfig(BaseModel):
    """RandAugment as the official fine-tune runs it (timm's ``rand-m9-mstd0.5-inc1``): ``layers``
    operations drawn per image, each applied with probability 0.5 at a magnitude drawn around
    ``magnitude`` (of 10) with spread ``magnitude_std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(default=2, ge=0, le=8, description="operations drawn per image; 0 is off")
    magnitude: float = Field(default=9.0, ge=0.0, le=10.0, description="strength of each operation, 0-10")
    magnitude_std: float = Field(default=0.5, ge=0.0, description="spread of the magnitude drawn per operation")


class Augmentation(BaseModel):
    """What a training crop goes through after it is decoded: the crop's area range, then for
    fine-tuning RandAugment and random erasing. Pre-training's is the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_scale: tuple[float, float] = SCALE
    rand_augment: RandAugmentConfig | None = None
    erase: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of erasing a box of each image")


SYNTHETIC_HAS_NO_LABELS = ("data.labels needs a data.url with labels (tar shards with .cls members, or an image "
                           "folder with class sub-folders); synthetic data (data.url None) has none")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | list[str] | None = Field(
        default=None,
        description="fsspec URL of the training images: tar shards (a brace pattern such as "
        "s3://bucket/train-{000000..001023}.tar, a list of URLs, or a folder with a manifest.json) "
        "or an image folder (class sub-folders or flat); None trains on a seeded synthetic in-memory dataset",
    )
    num_samples: int | None = Field(
        default=None, gt=0,
        description=f"samples per epoch; when omitted, the count in the dataset's manifest.json (url data) or "
        f"{SYNTHETIC_SAMPLES} (synthetic data)",
    )
    input_size: int = Field(default=32, gt=0, description="side of the square crops fed to the model")
    labels: bool = Field(
        default=False,
        description="read each sample's class label (batches become (images, labels)); needs a dataset with "
        "labels: .cls members in its tar shards, or an image folder with class sub-folders",
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank")
    shuffle_buffer: int = Field(
        default=1000, gt=0,
        description="samples each reader holds for its shuffle; each holds this many encoded images in memory",
    )
    files_per_read: int = Field(
        default=64, gt=0,
        description="image-folder files fetched together (concurrently on object stores) as one read unit",
    )
    io_retries: int = Field(
        default=5, ge=0,
        description="retries, with exponential backoff, of a shard read that fails with a transient error",
    )
    max_skip_fraction: float = Field(
        default=0.01, ge=0, le=1,
        description="share of its samples in an epoch that a rank may skip as undecodable (corrupt or missing "
        "images) before the run fails naming their shards; each rank checks its own share, per layout "
        "(a resume under another world size, worker count or batch starts the count again)",
    )
