"""The MTIL vocabulary of the official ZSCL code, which GIFT's official code reuses.

Plain data (class names and templates are facts), written out from:

- ZSCL: github.com/Thunderbeee/ZSCL, ``mtil/src/datasets/collections.py`` (one class
  per dataset: ``self.classnames`` and ``self.templates``), ``mtil/src/datasets/cifar10.py``
  (CIFAR100's templates: ``cifar10_template``), ``mtil/src/datasets/imagenet_classnames.py``
  and ``mtil/src/templates/openai_imagenet_template.py`` (ImageNet).
- GIFT: github.com/Luo-Jiaming/GIFT_CL, ``src/datasets/collections.py`` and
  ``src/datasets/cifar10.py``: the same names and templates (its changes to these files
  are samplers, prompt files and a Flowers label shift, none in the vocabulary).

Templates use ``{}`` for the class name, in ZSCL's order: the first is the training
prompt (ZSCL's ``dataset.template`` is ``templates[0]``) and zero-shot evaluation averages
all of them. Where ZSCL reads class names from the torchvision dataset object (Aircraft,
CIFAR100, DTD, Food, MNIST, OxfordPet, StanfordCars, SUN397) it replaces ``_`` by a space
and nothing else (``ClassificationDataset.process_labels``); the stream does the same at
build time. ``MNIST_CLASSNAMES`` and ``OXFORD_PET_CLASSNAMES`` are what torchvision gives
there (``MNIST.classes``; OxfordIIITPet's title-cased annotation names), kept for the
``image_folder`` format, which has no dataset object to read them from.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

ZSCL_TEMPLATES: dict[str, list[str]] = {
    # collections.py Aircraft
    "Aircraft": [
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, a type of aircraft.",
    ],
    # collections.py Caltech101
    "Caltech101": [
        "a photo of a {}.",
        "a painting of a {}.",
        "a plastic {}.",
        "a sculpture of a {}.",
        "a sketch of a {}.",
        "a tattoo of a {}.",
        "a toy {}.",
        "a rendition of a {}.",
        "a embroidered {}.",
        "a cartoon {}.",
        "a {} in a video game.",
        "a plushie {}.",
        "a origami {}.",
        "art of a {}.",
        "graffiti of a {}.",
        "a drawing of a {}.",
        "a doodle of a {}.",
        "a photo of the {}.",
        "a painting of the {}.",
        "the plastic {}.",
        "a sculpture of the {}.",
        "a sketch of the {}.",
        "a tattoo of the {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "the embroidered {}.",
        "the cartoon {}.",
        "the {} in a video game.",
        "the plushie {}.",
        "the origami {}.",
        "art of the {}.",
        "graffiti of the {}.",
        "a drawing of the {}.",
        "a doodle of the {}.",
    ],
    # cifar10.py cifar10_template
    "CIFAR100": [
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a black and white photo of a {}.",
        "a low contrast photo of a {}.",
        "a high contrast photo of a {}.",
        "a bad photo of a {}.",
        "a good photo of a {}.",
        "a photo of a small {}.",
        "a photo of a big {}.",
        "a photo of the {}.",
        "a blurry photo of the {}.",
        "a black and white photo of the {}.",
        "a low contrast photo of the {}.",
        "a high contrast photo of the {}.",
        "a bad photo of the {}.",
        "a good photo of the {}.",
        "a photo of the small {}.",
        "a photo of the big {}.",
    ],
    # collections.py DTD
    "DTD": [
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ],
    # collections.py EuroSAT
    "EuroSAT": [
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ],
    # collections.py Flowers
    "Flowers": [
        "a photo of a {}, a type of flower.",
    ],
    # collections.py Food
    "Food": [
        "a photo of a {}, a type of food.",
    ],
    # collections.py MNIST
    "MNIST": [
        'a photo of the number: "{}".',
    ],
    # collections.py OxfordPet
    "OxfordPet": [
        "a photo of a {}, a type of pet.",
    ],
    # collections.py StanfordCars
    "StanfordCars": [
        "a photo of a {}, a type of car.",
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ],
    # collections.py SUN397
    "SUN397": [
        "a photo of a {}.",
        "a photo of the {}.",
    ],
}


# collections.py Caltech101 (hard-coded; label order of torchvision's 101 categories)
CALTECH101_CLASSNAMES = [
    "off-center face", "centered face", "leopard", "motorbike", "accordion", "airplane", "anchor",
    "ant", "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "side of a car", "ceiling fan", "cellphone", "chair",
    "chandelier", "body of a cougar cat", "face of a cougar cat", "crab", "crayfish", "crocodile",
    "head of a  crocodile", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly",
    "electric guitar", "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo",
    "head of a flamingo", "garfield", "gerenuk", "gramophone", "grand piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline skate", "joshua tree", "kangaroo",
    "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah",
    "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza",
    "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors",
    "scorpion", "sea horse", "snoopy (cartoon beagle)", "soccer ball", "stapler", "starfish",
    "stegosaurus", "stop sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella",
    "watch", "water lilly", "wheelchair", "wild cat", "windsor chair", "wrench",
    "yin and yang symbol",
]  # fmt: skip

# collections.py EuroSAT (hard-coded; label order of torchvision's class folders)
EUROSAT_CLASSNAMES = [
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
]  # fmt: skip

# collections.py Flowers (hard-coded; label order)
FLOWERS_CLASSNAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
    "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
    "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove",
    "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]  # fmt: skip

# torchvision's MNIST.classes (ZSCL: self.train_dataset.classes)
MNIST_CLASSNAMES = [
    "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
    "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
]  # fmt: skip

# torchvision's OxfordIIITPet.classes (ZSCL: self.train_dataset.classes): the annotation
# names ("american_pit_bull_terrier") with each "_"-separated part title-cased.
OXFORD_PET_CLASSNAMES = [
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
    "Bengal", "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
    "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees", "Havanese",
    "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher", "Newfoundland",
    "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard", "Samoyed",
    "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx", "Staffordshire Bull Terrier",
    "Wheaten Terrier", "Yorkshire Terrier",
]  # fmt: skip

ZSCL_CLASSNAMES: dict[str, list[str]] = {
    "Caltech101": CALTECH101_CLASSNAMES,
    "EuroSAT": EUROSAT_CLASSNAMES,
    "Flowers": FLOWERS_CLASSNAMES,
    "MNIST": MNIST_CLASSNAMES,
    "OxfordPet": OXFORD_PET_CLASSNAMES,
}
"""Class names known without the data (label order); the others come from the dataset."""

# ImageNet (the control set): ZSCL's ``openai_classnames`` (1000) and
# ``openai_imagenet_template`` (80) are OpenAI's lists, the same that clip-benchmark
# (``imagenet1k``) and open_clip (``zero_shot_metadata``) ship. Rather than a fourth copy,
# their fingerprints: sha256 of the names (templates with "{}") joined by newlines.
IMAGENET_CLASSNAMES_SHA256 = "571ae1c583b4be7da87519494c52bf405a46af05d5815627c7a0dee997068b60"
IMAGENET_TEMPLATES_SHA256 = "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"


def fingerprint(items: Sequence[str]) -> str:
    """sha256 of ``items`` joined by newlines (compared with the ImageNet fingerprints)."""
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()
