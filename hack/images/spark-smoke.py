"""Run by hack/build-images.sh inside the runtime image through the entrypoint's `driver` argument: the
driver is up in client mode on the bind address it was given, the baked s3a jars are on its classpath,
and a job with a shuffle runs."""

from pyspark.sql import SparkSession

spark = SparkSession.builder.appName("image-smoke").getOrCreate()
conf = spark.sparkContext.getConf()
jvm = spark.sparkContext._jvm
for cls in ("org.apache.hadoop.fs.s3a.S3AFileSystem", "com.amazonaws.services.s3.AmazonS3Client"):
    jvm.java.lang.Class.forName(cls)
total = spark.range(1000).repartition(4).selectExpr("sum(id)").first()[0]
assert total == 499500, total
print(
    f"driver ok: deployMode={conf.get('spark.submit.deployMode')} bindAddress={conf.get('spark.driver.bindAddress')}"
    f" s3a classes loaded, sum={total}"
)
spark.stop()
