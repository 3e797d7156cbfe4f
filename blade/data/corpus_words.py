"""The built-in corpus's vocabulary (blade/data/corpus.py): the grammar's words for clean technical
documentation, the off-target domains (recipes, sports) and the boilerplate blocks."""

# Clean target domain: technical documentation.
NOUNS = """server client cache file process thread request response database table index query user
module function parameter value buffer queue socket connection node cluster worker scheduler job task
log message packet service container image volume disk kernel driver device network port address key
token session handler router endpoint library package compiler build test script command option
setting variable timeout limit path directory record field schema snapshot backup replica shard
partition stream event callback interface plugin version release update error warning exception lock
transaction checkpoint metric dashboard alert policy permission certificate proxy gateway pipeline
commit branch repository configuration system memory storage account host""".split()
MODIFIERS = "configuration log cache network user build test data system storage access".split()
VERBS = """write read store send receive update create delete load save check validate parse compile
run start stop restart cache index return handle process schedule monitor copy move open close lock
release encrypt compress configure initialize register resolve reject accept use require contain
replace merge export import flush rotate allocate track""".split()
INTRANSITIVE = "start stop fail restart finish crash exit wait respond reconnect".split()
ADJECTIVES = """new old default local remote main primary secondary small large slow fast active idle
empty full shared private public internal external temporary persistent current previous next first
last valid invalid secure stable custom global static dynamic optional required parallel distributed
compressed encrypted cached pending running failed""".split()
ADVERBS = "automatically quickly safely periodically asynchronously again first immediately".split()
PREPOSITIONS = "to from into in on for with after before during through over".split()
MODALS = "can should must will may".split()
CONJUNCTIONS = "when after before if until".split()
FIXED_CLAUSES = ["by default", "at startup", "on each request", "every ten seconds", "in most cases",
                 "during the upgrade", "after the first run"]
CONFIG_KEYS = """timeout max_workers cache_size log_level retry_count port buffer_size batch_size
queue_length max_connections flush_interval replica_count""".split()
CONFIG_VALUES = "8 16 30 60 100 256 1024 4096 true false debug info".split()
CONFIG_FLAGS = "compression debug_logging cache_warmup auto_restart tls strict_mode".split()

# Off-target domains: recipes and sports reports (different word lists, equally regular).
DISHES = "lemon_chicken tomato_soup apple_pie garlic_bread bean_stew rice_pudding carrot_cake".split()
INGREDIENTS = """flour sugar butter garlic onion tomato pepper salt lemon honey rice beans carrot potato
cheese milk cream basil parsley ginger chicken mushroom spinach vinegar""".split()
UNITS = "cups tablespoons teaspoons grams pinches slices handfuls".split()
NUMBERS = "two three four five six ten twenty".split()
ACTIONS = "add chop slice dice whisk stir pour fold sprinkle mix grate toss".split()
TOOLS = "bowl pan pot skillet saucepan tray dish".split()
MANNERS = "gently slowly thoroughly briskly evenly".split()
STATES = "golden tender crispy bubbling soft fragrant".split()
TEAMS = """Riverside_Rovers Northfield_United Harbor_City Eastbrook_Athletic Valley_Rangers
Lakeside_Wanderers""".split()
ROLES = "striker goalkeeper captain defender midfielder winger coach referee".split()
RESULTS = "beat defeated lost_to drew_with".split()
SCORES = "one_to_nil two_to_one three_to_two two_to_two four_to_nil".split()
DAYS = "Saturday Sunday Wednesday Friday".split()
PLAYS = ["scored a late goal", "saved a penalty", "crossed the ball", "headed the ball wide",
         "won a free kick", "cleared the ball off the line", "received a yellow card"]

BOILERPLATE = [
    "This file is licensed under the Example Public License, version 2. You may not use this file "
    "except in compliance with the license. Unless required by applicable law or agreed to in "
    "writing, software distributed under the license is distributed on an AS IS basis, without "
    "warranties or conditions of any kind.",
    "Home | Products | Pricing | Documentation | Blog | About Us | Careers | Contact | Sign In | Sign Up",
    "We use cookies to improve your experience on our website. By continuing to browse, you agree to "
    "our use of cookies. Accept all cookies | Manage preferences | Privacy policy",
    "Copyright (c) 2024 Example Corp. All rights reserved. Terms of Service | Privacy Policy | Sitemap",
    "Subscribe to our newsletter to get the latest news delivered to your inbox. Enter your email "
    "address below and click Subscribe. You can unsubscribe at any time.",
]
