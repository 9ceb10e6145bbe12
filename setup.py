"""pip install . — the ROS-free library and the `llmseg` command (no ROS 2 needed).

On a ROS 2 machine, `colcon build` uses CMakeLists.txt / package.xml instead and never
reads this file.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

INSTALL_REQUIRES = [
    "numpy>=1.24",
    "opencv-python-headless>=4.8",
    "torch>=2.1",
    "torchvision>=0.16",
    "transformers>=5.0",
    "peft>=0.13",
    "segment-anything>=1.0",
    "safetensors>=0.4",
    "huggingface_hub>=1.0",  # the `hf` CLI named in download hints; transformers 5 needs it too
    "tokenizers>=0.20",
    "pycocotools>=2.0.7",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "rosbags>=0.10",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        "ruff>=0.6",
        "mypy>=1.11",
        "types-PyYAML",
        "catkin_pkg>=1.0",
        "rosbags-image>=0.9",
        "accelerate>=1.0",
    ],
    "train": ["accelerate>=1.0"],
    "datagen": ["pillow>=10"],
    "quant": ["bitsandbytes>=0.43"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setup(
    name="llmseg_ros",
    version="0.1.0",
    description="Reasoning segmentation for robots (LLM-Seg) as a ROS 2 perception node",
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["llmseg_ros", "llmseg_ros.*"]),
    package_data={"llmseg_ros": ["assets/*", "interfaces/*.msg", "interfaces/*.srv", "py.typed"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["llmseg = llmseg_ros.cli:main"]},
)
