"""What the LoL and SICE TFDS builders share: array_record storage and the pair features."""

import numpy as np
import tensorflow_datasets as tfds


class PairedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of builders whose examples are {'low', 'high': uint8 RGB images, 'name': text}."""

  IMAGE_ENCODING = 'png'  # how 'low' and 'high' are stored
  HOMEPAGE = ''

  def __init__(self, *, file_format=None, **kwargs):
    # Random access (grain) needs array_record; tfds would default to tfrecord.
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(
      shape=(None, None, 3), dtype=np.uint8, encoding_format=self.IMAGE_ENCODING
    )
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {'low': image, 'high': image, 'name': tfds.features.Text()}
      ),
      supervised_keys=('low', 'high'),
      homepage=self.HOMEPAGE,
    )
