//! A small general-English corpus (written for this project, public domain) used to compute
//! the shared PCA down-projection deterministically, and as benchmark text.

/// General text for PCA initialisation of the shared projection.
pub const GENERAL_TEXT: &[&str] = &[
    "The sea was calm that morning, and the old harbour lay quiet under a pale sky. Fishermen mended \
their nets along the stone wall while gulls circled above the masts. A small boat drifted past the \
lighthouse, its sail folded, its captain asleep at the tiller. In the town, bakers opened their shutters \
and the smell of bread spread through the narrow streets.",
    "Photosynthesis is the process by which green plants use light energy to turn carbon dioxide and \
water into sugar and oxygen. It takes place mainly in the leaves, inside small structures called \
chloroplasts. The sugar feeds the plant and, through the food chain, almost every animal on Earth.",
    "Dear Maria, thank you for your letter. We arrived in the city on Tuesday after a long train ride, \
and the weather has been wonderful ever since. Tomorrow we plan to visit the museum and then have \
dinner with my cousins. I will send photos when we are back home. With love, Anna.",
    "To install the package, open a terminal and run the command shown below. If the installation \
fails, check that your network connection works and that you have permission to write to the target \
directory. The configuration file lives in your home folder; edit it to change the default settings.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them. The mission had taken \
years of planning by thousands of engineers. Millions of people watched the grainy pictures on \
television, and many still remember exactly where they were on that July night.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. Question: How \
many legs does a spider have? Answer: A spider has eight legs. Question: Who wrote Hamlet? Answer: \
William Shakespeare wrote Hamlet around the year 1600.",
];
